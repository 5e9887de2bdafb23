#!/usr/bin/env bash
# Run mora-dist under the deepspeed launcher.
#   One node:   launch/deepspeed.sh --gpus 2 -- run configs/run.yaml [key=value ...]
#   Multi-node: launch/deepspeed.sh --hostfile hostfile -- run configs/run.yaml   (hostfile: "node slots=N")
# Options before "--" go to the command generator (--gpus, --hostfile, --launcher, --master-addr,
# --master-port, --module); the rest is passed to `python -m mora_dist`.
set -euo pipefail
cmd=$(python -m mora_dist.distributed.launch_cmd deepspeed "$@")
echo "+ $cmd" >&2
eval "exec $cmd"
