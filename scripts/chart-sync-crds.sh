#!/usr/bin/env bash
# Copy the generated CRDs into the Helm chart, which installs them as templates.
#
#   scripts/chart-sync-crds.sh           copy crds/*.yaml and crds/without-cel/*.yaml into
#                                        charts/llmo/files/crds/{cel,without-cel}/
#   scripts/chart-sync-crds.sh --check   change nothing; exit 1 and name the files that differ
#
# The chart's copies are byte-for-byte copies of crds/ (which `llmo-operator crdgen` writes), so
# the check is a plain comparison. Run this after `make crds`.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SRC="$ROOT/crds"
DEST="$ROOT/charts/llmo/files/crds"

check=false
case "${1:-}" in
    "") ;;
    --check) check=true ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

# flavour (folder under the chart) -> source folder
declare -A FROM=([cel]="$SRC" [without-cel]="$SRC/without-cel")

drift=0
for flavour in cel without-cel; do
    src="${FROM[$flavour]}"
    dst="$DEST/$flavour"
    shopt -s nullglob
    sources=("$src"/*.yaml)
    shopt -u nullglob
    if [[ ${#sources[@]} -eq 0 ]]; then
        echo "error: no CRDs in $src" >&2
        exit 1
    fi
    if $check; then
        for f in "${sources[@]}"; do
            name="$(basename "$f")"
            if ! cmp -s "$f" "$dst/$name"; then
                echo "drift: charts/llmo/files/crds/$flavour/$name differs from ${f#"$ROOT"/}" >&2
                drift=1
            fi
        done
        # A CRD removed from crds/ must leave the chart too.
        for f in "$dst"/*.yaml; do
            [[ -e "$f" ]] || continue
            if [[ ! -e "$src/$(basename "$f")" ]]; then
                echo "drift: charts/llmo/files/crds/$flavour/$(basename "$f") has no source in ${src#"$ROOT"/}" >&2
                drift=1
            fi
        done
    else
        mkdir -p "$dst"
        rm -f "$dst"/*.yaml
        cp "${sources[@]}" "$dst/"
        echo "synced ${#sources[@]} CRDs into charts/llmo/files/crds/$flavour/"
    fi
done

if $check; then
    if [[ $drift -ne 0 ]]; then
        echo "the chart's CRDs are stale: run scripts/chart-sync-crds.sh" >&2
        exit 1
    fi
    echo "chart CRDs match crds/"
fi
