#!/usr/bin/env bash
# Creates .venv (if needed) and installs quantforge with everything it needs. Used by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch first and exactly: 2.13.0 is the CPU build this project is measured on; a looser request would pull a
# newer CUDA build (several GB). llama-cpp-python compiles llama.cpp from source on first install (minutes;
# pip caches the wheel); the multimodal library is not needed.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import quantforge, llama_cpp, torch, transformers" || { echo "bootstrap: install failed" >&2; exit 1; }
