#!/usr/bin/env bash
# Build llama.cpp's llama-batched-bench, the peer of `taskloom bench latency --peer llama.cpp`
# on a CPU, where no llama.cpp is installed. This machine reaches PyPI, not GitHub, so the
# sources are the llama.cpp that PyPI's llama-cpp-python sdist vendors (pin LLAMA_CPP_PYTHON to
# choose its version). Needs cmake and a C++ compiler; about 6 minutes on 2 cores. The
# programs land in $DEST/bin (default .llama.cpp/bin, which git ignores through
# .git/info/exclude); put that folder on PATH or give it to --llama-cpp-dir:
#   bash benchmarks/build_llama_cpp.sh
#   taskloom bench latency --peer llama.cpp --llama-cpp-dir .llama.cpp/bin
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
VERSION=${LLAMA_CPP_PYTHON:-0.3.36}
DEST=${DEST:-$PWD/.llama.cpp}
grep -qx '/.llama.cpp/' .git/info/exclude 2>/dev/null || echo '/.llama.cpp/' >> .git/info/exclude
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$work" "llama-cpp-python==$VERSION"
tar xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
# GGML_NATIVE: the kernels for this CPU's instruction set, as a local llama.cpp build has them,
# but for AMX: on this sandboxed machine ggml's AMX kernels die of SIGILL (at `tilezero`) on
# the first quantized matrix product, although ggml asks the kernel for the tile state and
# oneDNN's AMX products (torch's bf16 matmuls) run here. The cause is unknown. NO_AMX=0 keeps
# AMX, for a machine where it works. Float32 products use no AMX in either engine.
flags=""
[ "${NO_AMX:-1}" = 1 ] && flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DBUILD_SHARED_LIBS=OFF > "$work/cmake.log" 2>&1 || { tail -30 "$work/cmake.log"; exit 1; }
# the compiler's warnings (many, on ggml's intrinsics) stay in the log unless the build fails
cmake --build "$work/build" -j "$(nproc)" --target llama-batched-bench > "$work/build.log" 2>&1 ||
  { grep -B2 -A8 -m5 "error" "$work/build.log"; exit 1; }
mkdir -p "$DEST/bin"
cp "$work/build/bin/llama-batched-bench" "$DEST/bin/"
"$DEST/bin/llama-batched-bench" --version 2>&1 | grep -m1 version
echo "built $DEST/bin/llama-batched-bench"
