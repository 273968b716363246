# Sourced by scripts/demo.sh and scripts/test.sh: creates the environment once, idempotently, on a machine with
# only python3.
#
# Locked (the default): .venv gets exactly requirements-lock.txt (refresh it with scripts/lock.sh), so a
# dependency's new release cannot change what the suite runs on. MICS_UNLOCKED=1: .venv-unlocked gets the newest
# releases that satisfy pyproject.toml's floors, to see what a new release would break; torch stays the CPU build
# of MICS_TORCH_VERSION (default 2.13.0), since the newest torch on PyPI is the multi-GB CUDA build.
# Either way torch is installed FIRST as its CPU build: resolving torch through transformers/accelerate would
# pull the multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCK="$ROOT/requirements-lock.txt"
if [ "${MICS_UNLOCKED:-0}" = "1" ]; then
    VENV="$ROOT/.venv-unlocked"
    STAMP_INPUTS=("$ROOT/pyproject.toml")
else
    VENV="$ROOT/.venv"
    STAMP_INPUTS=("$ROOT/pyproject.toml" "$LOCK")
fi
PY="$VENV/bin/python"
STAMP="$VENV/.mics_hf_installed"
want="$(cat "${STAMP_INPUTS[@]}" | python3 -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"

_install_torch() {  # $1: a requirement such as torch==2.13.0+cpu; pip's own find-links first, then PyTorch's index
    "$PY" -m pip install -q --no-deps "$1" 2>/dev/null ||
        _quiet "$PY" -m pip install -q --no-deps --extra-index-url https://download.pytorch.org/whl/cpu "$1"
}

_quiet() {  # pip warns about every empty local index of some machines; keep real errors
    "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    [ -x "$PY" ] || python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    if [ "${MICS_UNLOCKED:-0}" = "1" ]; then
        "$PY" -c "import importlib.metadata as m; m.version('torch')" >/dev/null 2>&1 || _install_torch "torch==${MICS_TORCH_VERSION:-2.13.0}"
        # hold the CPU build just installed: an eager upgrade would otherwise swap in the newest CUDA build
        held="$(mktemp)"; "$PY" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > "$held"
        _quiet "$PY" -m pip install -q --upgrade --upgrade-strategy eager -c "$held" -e "$ROOT[recipes,test]"
        rm -f "$held"
    else
        _install_torch "$(grep -E '^torch==' "$LOCK")"
        # --no-deps: the lock lists every dependency, so pip installs exactly these and resolves nothing
        _quiet "$PY" -m pip install -q --no-deps -r "$LOCK"
        "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" 2>/dev/null ||
            _quiet "$PY" -m pip install -q --no-deps -e "$ROOT"
        "$PY" -m pip check >/dev/null || { "$PY" -m pip check >&2; echo "requirements-lock.txt is inconsistent; run scripts/lock.sh" >&2; exit 1; }
    fi
    echo "$want" > "$STAMP"
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}" WANDB_MODE="${WANDB_MODE:-offline}"
export PATH="$VENV/bin:$PATH"
