#!/usr/bin/env bash
# Set up (see setup.sh) and run the test suite. Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/launch/setup.sh"
cd "$ROOT"
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
