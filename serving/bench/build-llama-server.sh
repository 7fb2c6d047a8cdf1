#!/usr/bin/env bash
# Builds llama.cpp's llama-server (the CPU anchor for bench-serve.sh) from the llama.cpp tree
# vendored in the llama-cpp-python sdist on PyPI, once, into a cache outside the checkout, and
# prints the binary's path. The binary finds its shared libraries next to it in the build tree,
# so the tree stays in the cache. Needs a C++ compiler; cmake and ninja come from PyPI.
# About 12 minutes on 2 cores.
set -euo pipefail
VERSION="0.3.36"
CACHE="${LLMO_CACHE:-$HOME/.cache/llmo}/llama.cpp"
SRC="$CACHE/llama_cpp_python-$VERSION"
BIN="$SRC/vendor/llama.cpp/build/bin/llama-server"
if [[ -x "$BIN" ]]; then
    echo "$BIN"
    exit 0
fi
mkdir -p "$CACHE"
if [[ ! -d "$SRC" ]]; then
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$CACHE" >&2
    tar -xzf "$CACHE/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE"
fi
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
    python3 -m pip install --quiet cmake ninja >&2
fi
cd "$SRC/vendor/llama.cpp"
cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build build -j "${JOBS:-2}" --target llama-server >&2
echo "$BIN"
