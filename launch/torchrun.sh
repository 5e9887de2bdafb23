#!/usr/bin/env bash
# Run mora-dist under torchrun on one node (rendezvous on 127.0.0.1):
#   launch/torchrun.sh --nproc 2 -- run configs/run.yaml [key=value ...]
# Several nodes: run on each node with --nnodes N --master-addr <first node>.
set -euo pipefail
cmd=$(python -m mora_dist.distributed.launch_cmd torchrun "$@")
echo "+ $cmd" >&2
eval "exec $cmd"
