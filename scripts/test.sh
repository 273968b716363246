#!/usr/bin/env bash
# The test suite: sets up .venv if needed, then runs every test (slow ones included) on CPU with gloo.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
set +e
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no test: treat as a failure, the suite must never be empty" >&2
    exit 1
fi
exit "$rc"
