#!/usr/bin/env bash
# Run mora-dist under torchrun on one node (rendezvous on 127.0.0.1):
#   launch/torchrun.sh --nproc 2 -- run configs/run.yaml [key=value ...]
# Several nodes: run the same command on every node, with --nnodes N --master-addr <first node> (a c10d
# rendezvous there, at --master-port); export GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME on each node when the
# nodes have several interfaces.
set -euo pipefail
cmd=$(python -m mora_dist.distributed.launch_cmd torchrun "$@")
echo "+ $cmd" >&2
eval "exec $cmd"
