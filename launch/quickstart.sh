#!/usr/bin/env bash
# Set up (see setup.sh) and run the main job: MoRA and SeqLoRA side by side on the quickstart stream
# (configs/quickstart.yaml), ending in runs/quickstart-compare/compare.md and one report per method.
# Extra arguments are config overrides (key.sub=value). Rerun the same command to resume after a crash.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/launch/setup.sh"
cd "$ROOT"
mora-dist compare configs/quickstart.yaml --methods mora,seq_lora "$@"
