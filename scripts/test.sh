#!/usr/bin/env bash
# The test suite: sets up .venv if needed, then runs every test (slow ones included) on CPU with gloo.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
# The suite starts many Python processes (torchrun / accelerate ranks, worker pools), each importing
# mics_hf from source; with PYTHONDONTWRITEBYTECODE set (as on some machines) every one would compile it
# again. Compile once here (only what changed since the last run); site-packages were compiled by pip.
python -m compileall -q src tests recipes >/dev/null || true
set +e
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no test: treat as a failure, the suite must never be empty" >&2
    exit 1
fi
exit "$rc"
