#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs, lints, runs every test (slow ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check quantforge tests scripts
exec .venv/bin/python -m pytest "$@"
