#!/usr/bin/env bash
# Installs llama-cpp-python (the version pyproject.toml pins) into the venv given as $1, compiled for this CPU
# without AMX. Called by bootstrap.sh; does nothing when the installed build already has these flags.
#
# Why not llama.cpp's default (GGML_NATIVE=ON, -march=native): on a CPU with AMX (Sapphire Rapids and later), that
# build takes ggml's AMX path for quantized types, and llama-cpp-python 0.3.36's build of it crashes (SIGSEGV) in
# the first batched decode of any Q8_0/Q4_0/K-quant file; F16 runs. Measured on a 2-core Xeon with amx_int8. So
# the ISA flags are set from /proc/cpuinfo instead, AMX left out; the speed on AVX-512/AVX2 is unchanged.
#
# pip's wheel cache is keyed by the sdist alone, not by CMAKE_ARGS, so it would hand back a wheel built with other
# flags; the build goes to a wheelhouse of our own, one folder per flag set, reused by later installs.
set -euo pipefail
VENV=${1:?usage: install_llama_cpp.sh VENV [CONSTRAINTS]}
CONSTRAINTS=${2:-}
cd "$(dirname "$0")/.."
VERSION=$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml | head -n 1 | cut -d= -f3)

isa_flags() {
  local cpu flags=(-DGGML_NATIVE=OFF)
  cpu=$(grep -m 1 '^flags' /proc/cpuinfo 2>/dev/null || true)
  has() { [[ " $cpu " == *" $1 "* ]]; }
  has avx && flags+=(-DGGML_AVX=ON)
  has avx2 && flags+=(-DGGML_AVX2=ON)
  has fma && flags+=(-DGGML_FMA=ON)
  has f16c && flags+=(-DGGML_F16C=ON)
  has avx512f && flags+=(-DGGML_AVX512=ON)
  has avx512_vnni && flags+=(-DGGML_AVX512_VNNI=ON)
  has avx512vbmi && flags+=(-DGGML_AVX512_VBMI=ON)
  has avx512_bf16 && flags+=(-DGGML_AVX512_BF16=ON)
  echo "${flags[*]}"
}

if [ -n "${CMAKE_ARGS:-}" ]; then  # the user's own choice (a CUDA build, say) wins
  ARGS="$CMAKE_ARGS"
elif [ "$(uname -m)" = x86_64 ] && [ -r /proc/cpuinfo ]; then
  ARGS="-DLLAVA_BUILD=OFF $(isa_flags)"
else
  ARGS="-DLLAVA_BUILD=OFF"
fi
STAMP="$VENV/.llama-cpp-build"
WANT="$VERSION $ARGS"
# up to date: built with these flags; or installed by other means (a user's own CUDA build), which is left alone
if [ "$(cat "$STAMP" 2>/dev/null || echo none)" = "$WANT" ] || [ ! -f "$STAMP" ]; then
  if "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    exit 0
  fi
fi
HOUSE="${QUANTFORGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/quantforge}/wheels/llama-cpp-python-$VERSION-$(printf '%s' "$ARGS" | sha256sum | cut -c1-16)"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if ! ls "$HOUSE"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "bootstrap: compiling llama.cpp (llama-cpp-python==$VERSION has no wheel on PyPI): about 5-15 minutes on two" \
       "cores, once (CMAKE_ARGS=$ARGS)" >&2
  mkdir -p "$HOUSE"
  CMAKE_ARGS="$ARGS" "${PIP[@]}" wheel --quiet --no-cache-dir --no-deps -w "$HOUSE" "llama-cpp-python==$VERSION" \
    2>&1 | grep -v "^WARNING: Location" || true
fi
WHEEL=("$HOUSE"/llama_cpp_python-"$VERSION"-*.whl)
# --force-reinstall replaces a build with other flags; it would reinstall numpy & co. too, so it goes without
# dependencies, and a second, plain install brings those (diskcache, jinja2, numpy) into a fresh venv.
"${PIP[@]}" install --quiet --force-reinstall --no-deps "${WHEEL[0]}" 2>&1 | grep -v "^WARNING: Location" || true
"${PIP[@]}" install --quiet ${CONSTRAINTS:+-c "$CONSTRAINTS"} "${WHEEL[0]}" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import llama_cpp" || { echo "bootstrap: llama-cpp-python did not install" >&2; exit 1; }
echo "$WANT" > "$STAMP"
