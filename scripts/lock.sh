#!/usr/bin/env bash
# Refresh requirements-lock.txt: the exact versions scripts/test.sh and scripts/demo.sh install.
#   scripts/lock.sh                 # newest releases that satisfy pyproject.toml's floors
#   MICS_TORCH_VERSION=2.13.0 scripts/lock.sh
# torch is locked as its CPU build (+cpu) so the lock never pulls the CUDA build's ~17 nvidia packages. It is
# resolved from pip's configured find-links if there are any, else from PyTorch's CPU wheel index.
# Run the suite on the new lock (scripts/test.sh) before committing it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TORCH="${MICS_TORCH_VERSION:-2.13.0}"
UV="$(command -v uv || true)"
if [ -z "$UV" ]; then
    TOOLS="$ROOT/.venv-tools"
    [ -x "$TOOLS/bin/uv" ] || { python3 -m venv "$TOOLS" && "$TOOLS/bin/python" -m pip install -q uv; }
    UV="$TOOLS/bin/uv"
fi
links="${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}"
if [ -n "$links" ]; then
    source_args=(--find-links "$links")
else
    source_args=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi
# The lock is for the Python that will run it: wheels such as torch's are built per Python version.
PYVER="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
UV_PYTHON_DOWNLOADS=never "$UV" pip compile pyproject.toml --extra recipes --extra test --python-version "$PYVER" \
    --python-platform x86_64-manylinux_2_28 --override <(echo "torch==${TORCH}+cpu") "${source_args[@]}" \
    --no-header --no-annotate -o requirements-lock.txt.new
{
    echo "# Exact versions installed by scripts/test.sh and scripts/demo.sh (refresh: scripts/lock.sh)."
    echo "# Generated $(date -u +%Y-%m-%d) from pyproject.toml [recipes,test] for CPython ${PYVER} on x86-64 Linux."
    cat requirements-lock.txt.new
} > requirements-lock.txt
rm requirements-lock.txt.new
echo "wrote requirements-lock.txt ($(grep -c '==' requirements-lock.txt) packages)"
