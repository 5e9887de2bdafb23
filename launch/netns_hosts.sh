#!/usr/bin/env bash
# Two "hosts" on one machine, for real multi-node runs without a cluster (root only; Linux network namespaces).
#
#   launch/netns_hosts.sh check                 exit 0 if hosts can be made here, else print why and exit 1
#   launch/netns_hosts.sh up STATE_DIR          create them; STATE_DIR (new or empty) keeps keys, configs, logs
#   launch/netns_hosts.sh exec STATE_DIR N CMD  run CMD on host N (1 or 2), as if logged in there
#   launch/netns_hosts.sh down STATE_DIR        stop everything started there and remove both hosts
#
# Each host is a network namespace with its own loopback and one end of a veth pair (interface "mora0" on both,
# so GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME=mora0 is right everywhere): mora-node1 = 10.213.0.1/24 and
# mora-node2 = 10.213.0.2/24. No other address is configured, so traffic can only go between the two hosts.
# Host names resolve inside the namespaces (a private /etc/hosts through /etc/netns/NAME/, which `ip netns exec`
# mounts over /etc), every command runs with its host's name (a UTS namespace), and each host runs sshd on its
# address with a throwaway host key; a throwaway client key is authorised for root and the ssh client
# configuration of both hosts uses it, so `ssh mora-node2 hostname` works from either host, as pdsh, the
# deepspeed launcher and mpiexec (Hydra) expect. Both hosts see the same file system (venv, repository, data).
# `down` kills the processes left in the two namespaces and deletes them; it is safe to call twice.
set -euo pipefail

ADDR1=10.213.0.1
ADDR2=10.213.0.2
IFNAME=mora0

die() { echo "netns_hosts: $*" >&2; exit 1; }

check() {
  [ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)"; return 1; }
  command -v ip >/dev/null || { echo "no 'ip' command (apt-get install iproute2)"; return 1; }
  command -v unshare >/dev/null || { echo "no 'unshare' command (util-linux)"; return 1; }
  [ -x /usr/sbin/sshd ] || { echo "no /usr/sbin/sshd (apt-get install openssh-server)"; return 1; }
  command -v ssh-keygen >/dev/null || { echo "no ssh-keygen (apt-get install openssh-client)"; return 1; }
  local probe="mora-probe-$$"
  if ! ip netns add "$probe" 2>/dev/null; then
    echo "cannot create a network namespace here (ip netns add failed: no CAP_SYS_ADMIN?)"; return 1
  fi
  local ok=0
  ip netns exec "$probe" unshare --uts true 2>/dev/null || ok=$?
  ip netns del "$probe"
  [ "$ok" = 0 ] || { echo "cannot enter a network + UTS namespace here"; return 1; }
}

names() {  # the two namespace names of a state dir
  [ -f "$1/netns" ] || die "$1 holds no hosts (run: $0 up $1)"
  cat "$1/netns"
}

up() {
  local state="$1"
  mkdir -p "$state"
  state="$(cd "$state" && pwd)"
  [ ! -f "$state/netns" ] || die "$state already holds hosts; run: $0 down $state"
  local why; why=$(check) || die "$why"
  local tag="mora$$"
  local ns1="${tag}-1" ns2="${tag}-2"
  echo "$ns1 $ns2" > "$state/netns"
  trap 'down "$state" >/dev/null 2>&1 || true' ERR
  rm -f "$state"/host_key* "$state"/id_ed25519* "$state"/known_hosts
  ssh-keygen -q -t ed25519 -N '' -C mora-netns-host -f "$state/host_key"
  ssh-keygen -q -t ed25519 -N '' -C mora-netns-client -f "$state/id_ed25519"
  cp "$state/id_ed25519.pub" "$state/authorized_keys"
  chmod 600 "$state/authorized_keys"
  mkdir -p /run/sshd  # sshd's privilege separation directory
  local i ns addr
  for i in 1 2; do
    ns="${tag}-$i"; addr=$([ "$i" = 1 ] && echo $ADDR1 || echo $ADDR2)
    mkdir -p "/etc/netns/$ns/ssh"
    printf '127.0.0.1 localhost\n%s mora-node1\n%s mora-node2\n' "$ADDR1" "$ADDR2" > "/etc/netns/$ns/hosts"
    cat > "/etc/netns/$ns/ssh/sshd_config" <<EOF
ListenAddress $addr
HostKey $state/host_key
AuthorizedKeysFile $state/authorized_keys
PidFile $state/sshd-$i.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
LogLevel ERROR
EOF
    cat > "/etc/netns/$ns/ssh/ssh_config" <<EOF
Host *
  IdentityFile $state/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile $state/known_hosts
  StrictHostKeyChecking no
  BatchMode yes
  LogLevel ERROR
EOF
    ip netns add "$ns"
    # IPv4 only: no IPv6 link-local address either, so the two addresses below are the only ones
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    ip -n "$ns" link set lo up
  done
  # one veth pair; each end gets the same name inside its namespace
  ip link add "${tag}a" type veth peer name "${tag}b"
  ip link set "${tag}a" netns "$ns1"
  ip link set "${tag}b" netns "$ns2"
  ip -n "$ns1" link set "${tag}a" name $IFNAME
  ip -n "$ns2" link set "${tag}b" name $IFNAME
  ip -n "$ns1" addr add $ADDR1/24 dev $IFNAME
  ip -n "$ns2" addr add $ADDR2/24 dev $IFNAME
  ip -n "$ns1" link set $IFNAME up
  ip -n "$ns2" link set $IFNAME up
  for i in 1 2; do
    run_on "$state" "$i" /usr/sbin/sshd -E "$state/sshd-$i.log"
  done
  # ready when each host reaches the other's sshd
  local tries
  for i in 1 2; do
    for tries in $(seq 50); do
      if run_on "$state" "$i" ssh "mora-node$((3 - i))" true 2>/dev/null; then break; fi
      [ "$tries" -lt 50 ] || die "sshd on mora-node$((3 - i)) not reachable; see $state/sshd-*.log"
      sleep 0.2
    done
  done
  trap - ERR
  echo "up: mora-node1=$ADDR1 ($ns1), mora-node2=$ADDR2 ($ns2), interface $IFNAME, state in $state"
}

run_on() {  # run_on STATE N CMD...: CMD in host N's network, mount (hosts, ssh config) and UTS namespaces
  local state="$1" i="$2"; shift 2
  local ns; ns=$(names "$state" | cut -d' ' -f"$i")
  ip netns exec "$ns" unshare --uts sh -c 'hostname "$0" && exec "$@"' "mora-node$i" "$@"
}

down() {
  local state="$1" ns pid
  [ -f "$state/netns" ] || return 0
  for ns in $(cat "$state/netns"); do
    if ip netns list | grep -qw "$ns"; then
      for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns del "$ns" || true
    fi
    rm -rf "/etc/netns/$ns"
  done
  rm -f "$state/netns"
  echo "down: $state"
}

case "${1:-}" in
  check) check ;;
  up) [ $# = 2 ] || die "usage: $0 up STATE_DIR"; up "$2" ;;
  exec) [ $# -ge 4 ] || die "usage: $0 exec STATE_DIR N CMD..."; state="$2"; n="$3"; shift 3
        [[ "$n" == 1 || "$n" == 2 ]] || die "host number $n: 1 or 2"; run_on "$state" "$n" "$@" ;;
  down) [ $# = 2 ] || die "usage: $0 down STATE_DIR"; down "$2" ;;
  *) die "usage: $0 check | up STATE_DIR | exec STATE_DIR N CMD... | down STATE_DIR" ;;
esac
