#!/usr/bin/env bash
# A two-node Slurm cluster on the two hosts of netns_hosts.sh, to run launch/slurm.sbatch for real on one machine.
# Needs Debian's slurmctld, slurmd, slurm-client and munge (apt-get install --no-install-recommends ...).
#
#   launch/netns_hosts.sh up STATE && launch/slurm_netns.sh up STATE
#   SLURM_CONF=STATE/slurm.conf GLOO_SOCKET_IFNAME=mora0 MORA_PROCS_PER_NODE=1 \
#     launch/netns_hosts.sh exec STATE 1 sbatch --gpus-per-node=0 --cpus-per-task=1 launch/slurm.sbatch CONFIG
#   launch/slurm_netns.sh down STATE && launch/netns_hosts.sh down STATE
#
# munged runs with a throwaway key and its socket in STATE (both hosts see the file system), slurmctld on
# mora-node1, one slurmd per host. slurmd 22.05 cannot start without cgroups, refuses the host's hybrid v1/v2
# layout with cgroup/v2, and the namespaces' fresh /sys has none mounted: each slurmd therefore mounts the v1
# controllers it needs (freezer, cpuset, memory, devices) under a tmpfs in its own mount namespace.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() { echo "slurm_netns: $*" >&2; exit 1; }
[ $# = 2 ] || die "usage: $0 up|down STATE_DIR"
state="$(cd "$2" && pwd)"
[ -f "$state/netns" ] || die "$state holds no hosts (run: launch/netns_hosts.sh up $state)"
on() { bash "$HERE/netns_hosts.sh" exec "$state" "$@"; }
case "$1" in
  up)
    for c in munged slurmctld slurmd sinfo; do command -v $c >/dev/null || [ -x /usr/sbin/$c ] || die "no $c"; done
    mkdir -p "$state/munge" "$state/ctld" "$state/slurmd-mora-node1" "$state/slurmd-mora-node2"
    chmod 700 "$state/munge"
    dd if=/dev/urandom of="$state/munge.key" bs=1024 count=1 2>/dev/null
    chmod 600 "$state/munge.key"
    /usr/sbin/munged --key-file="$state/munge.key" --socket="$state/munge/munge.socket" --force \
      --pid-file="$state/munge/munged.pid" --log-file="$state/munge/munged.log" --seed-file="$state/munge/seed"
    cat > "$state/slurm.conf" <<CONF
ClusterName=mora
SlurmctldHost=mora-node1(10.213.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$state/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/slurmd-%n
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd-%n.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/linear
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=mora-node1 NodeAddr=10.213.0.1 CPUs=$(nproc) State=UNKNOWN
NodeName=mora-node2 NodeAddr=10.213.0.2 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=mora-node1,mora-node2 Default=YES MaxTime=INFINITE State=UP
CONF
    printf 'CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\n' > "$state/cgroup.conf"
    on 1 slurmctld -f "$state/slurm.conf"
    for i in 1 2; do
      on "$i" sh -c 'mount -t tmpfs none /sys/fs/cgroup && for c in freezer cpuset memory devices; do
        mkdir -p /sys/fs/cgroup/$c && mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c; done &&
        exec slurmd -f "$0" -N "$1"' "$state/slurm.conf" "mora-node$i"
    done
    for _ in $(seq 30); do
      if SLURM_CONF="$state/slurm.conf" on 1 sinfo -h -N -o %t | grep -qv idle; then sleep 1; else break; fi
    done
    SLURM_CONF="$state/slurm.conf" on 1 sinfo -N
    ;;
  down)  # slurmctld and slurmd live in the namespaces (netns_hosts.sh down kills them); munged does not
    [ -f "$state/munge/munged.pid" ] && kill "$(cat "$state/munge/munged.pid")" 2>/dev/null || true
    rm -f "$state/munge/munged.pid"
    ;;
  *) die "usage: $0 up|down STATE_DIR" ;;
esac
