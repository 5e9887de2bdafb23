#!/usr/bin/env bash
# Run mora-dist under the deepspeed launcher.
#   One node:   launch/deepspeed.sh --gpus 2 -- run configs/run.yaml [key=value ...]
#   Multi-node: launch/deepspeed.sh --hostfile hostfile -- run configs/run.yaml   (hostfile: "node slots=N")
# Options before "--" go to the command generator (--gpus, --hostfile, --launcher, --master-addr,
# --master-port, --module); the rest is passed to `python -m mora_dist`.
# With a hostfile the rendezvous is its first host, and this shell's run environment (PATH with the venv,
# TORCH_EXTENSIONS_DIR, MORA_*, HF_*, GLOO_*/NCCL_* interface choices, ...) reaches every node through a
# temporary DS_ENV_FILE (your own ~/.deepspeed_env or ./.deepspeed_env lines are added after it and win).
set -euo pipefail
cmd=$(python -m mora_dist.distributed.launch_cmd deepspeed "$@")
echo "+ $cmd" >&2
if [[ " $* " == *" --hostfile "* ]]; then
  envfile=$(mktemp "${TMPDIR:-/tmp}/mora-dist-env.XXXXXX")
  trap 'rm -f "$envfile"' EXIT
  python -m mora_dist.distributed.launch_cmd envfile > "$envfile"
  export DS_ENV_FILE="$envfile"
  eval "$cmd"
else
  eval "exec $cmd"
fi
