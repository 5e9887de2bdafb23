#!/usr/bin/env bash
# Set up (see setup.sh) and run the main job.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/launch/setup.sh"
cd "$ROOT"
mora-dist run configs/quickstart.yaml "$@"
