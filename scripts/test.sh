#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs, lints, runs every test (slow ones included).
#   bash scripts/test.sh --fast     the fast tier: lint, then every test not marked slow (about 2 minutes on
#                                   two cores; no model builds, no mounts, no npm)
# Other arguments go to pytest, e.g. `bash scripts/test.sh --fast tests/test_plan.py -x`. The tests run in
# QUANTFORGE_TEST_WORKERS processes (pytest-xdist, default 2, a file per worker at a time; 0: in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QUANTFORGE_VENV:-.venv}
tier=()
if [ "${1:-}" = --fast ]; then
  shift
  tier=(-m "not slow")
fi
bash scripts/bootstrap.sh
"$VENV/bin/ruff" check quantforge tests scripts
exec "$VENV/bin/python" -m pytest -n "${QUANTFORGE_TEST_WORKERS:-2}" --dist loadfile "${tier[@]}" "$@"
