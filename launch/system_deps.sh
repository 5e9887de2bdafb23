#!/usr/bin/env bash
# Debian/Ubuntu packages the multi-node tests use (two hosts made of network namespaces, see netns_hosts.sh):
# iproute2 (ip netns), util-linux (unshare), openssh-server/-client (sshd on each host), pdsh (the deepspeed
# launcher's default fan-out). Idempotent and quiet: installs only what is missing. Without root or apt-get it
# says so and exits 0; the tests that need these packages then skip with the reason.
set -euo pipefail
PKGS=(iproute2 util-linux openssh-server openssh-client pdsh)
CMDS=(ip unshare /usr/sbin/sshd ssh pdsh)
missing=()
for i in "${!PKGS[@]}"; do
  command -v "${CMDS[$i]}" >/dev/null 2>&1 || missing+=("${PKGS[$i]}")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "[system_deps] present: ${PKGS[*]}"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[system_deps] missing ${missing[*]} and cannot install them here (needs root and apt-get): multi-node tests will skip"
  exit 0
fi
echo "[system_deps] installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# the tests start their own sshd inside their namespaces: keep the package from starting a system one
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
