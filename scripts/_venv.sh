# Sourced by scripts/demo.sh and scripts/test.sh: creates .venv once, idempotently, on a machine with python3.
# torch is installed FIRST and pinned to the CPU build when none is present: a venv that resolves torch through
# transformers/accelerate would pull a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.mics_hf_installed"
if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    if ! "$PY" -c "import torch" >/dev/null 2>&1; then
        "$PY" -m pip install -q "torch==${MICS_TORCH_VERSION:-2.13.0}"
    fi
    "$PY" -m pip install -q -e "$ROOT[recipes,test]"
    touch "$STAMP"
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}" WANDB_MODE="${WANDB_MODE:-offline}"
export PATH="$VENV/bin:$PATH"
