#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager and kube-scheduler v1.20.2 from Debian's
# `kubernetes` source package, once, into a cache outside the checkout; install etcd.
# Prints the directory holding the binaries. Running it again with the binaries in place does
# nothing but check them.
#
# Two fixes make the 1.20.2 tree build and run with Debian's Go:
#  1. vendored modern-go/reflect2 1.0.1 crashes the API server on the first server-side apply
#     with Go >= 1.18; Debian's 1.0.2 replaces it;
#  2. the generated OpenAPI definitions are not in the source package: `make gen_openapi` first.
set -euo pipefail

VERSION="1.20.2"
CACHE="${LLMO_CACHE:-$HOME/.cache/llmo}"
OUT="$CACHE/k8s-$VERSION"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler)

log() { printf '[k8s-build] %s\n' "$*" >&2; }

have_binaries() {
  for b in "${BINARIES[@]}"; do
    [[ -x "$OUT/$b" ]] || return 1
  done
  "$OUT/kube-apiserver" --version 2>/dev/null | grep -q "v$VERSION"
}

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

install_packages() {
  local missing=()
  command -v etcd >/dev/null || missing+=(etcd-server)
  if ! have_binaries; then
    command -v go >/dev/null || missing+=(golang-go)
    [[ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ]] || missing+=(golang-github-modern-go-reflect2-dev)
    command -v rsync >/dev/null || missing+=(rsync)
    dpkg -s dpkg-dev >/dev/null 2>&1 || missing+=(dpkg-dev)
  fi
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

enable_sources() {
  if ! grep -rqs "^Types:.*deb-src" /etc/apt/sources.list.d/ && ! grep -qs "^deb-src" /etc/apt/sources.list; then
    log "enabling Debian source packages (deb-src bookworm main)"
    printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      | as_root tee /etc/apt/sources.list.d/llmo-deb-src.sources >/dev/null
    as_root apt-get update -qq
  fi
}

build() {
  local work="$CACHE/k8s-src"
  mkdir -p "$work" "$OUT"
  if [[ ! -d "$work/src/k8s.io/kubernetes" ]]; then
    enable_sources
    log "downloading the kubernetes $VERSION source package"
    # bookworm ships it as 1.20.5+really1.20.2: the 1.20.2 tree under a higher version number.
    (cd "$work" && apt-get source --download-only kubernetes >/dev/null 2>&1)
    local orig
    orig=$(compgen -G "$work/kubernetes_*really$VERSION.orig.tar.*" || compgen -G "$work/kubernetes_$VERSION.orig.tar.*" || true)
    [[ -n "$orig" ]] || { log "no kubernetes $VERSION source tarball in $work"; exit 1; }
    mkdir -p "$work/src/k8s.io/kubernetes"
    tar -xf "$orig" -C "$work/src/k8s.io/kubernetes" --strip-components=1
    # Fix 1: Debian's reflect2 1.0.2 in place of the vendored 1.0.1.
    local vendored="$work/src/k8s.io/kubernetes/vendor/github.com/modern-go/reflect2"
    rm -rf "$vendored"
    cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$vendored"
    rm -f "$vendored/go.mod" "$vendored/go.sum"
  fi
  local tree="$work/src/k8s.io/kubernetes"
  export GOPATH="$work" GO111MODULE=off CGO_ENABLED=0 GOFLAGS=-mod=vendor GOCACHE="$CACHE/go-build"
  unset GOFLAGS
  cd "$tree"
  if [[ ! -f pkg/generated/openapi/zz_generated.openapi.go ]]; then
    log "generating OpenAPI definitions (make gen_openapi)"
    make gen_openapi >"$work/gen_openapi.log" 2>&1 || { log "make gen_openapi failed; see $work/gen_openapi.log"; exit 1; }
  fi
  local ldflags=""
  for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=v$VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=20 -X $pkg.gitTreeState=clean"
  done
  for b in "${BINARIES[@]}"; do
    log "building $b (the first build takes about 10 minutes on 2 cores)"
    go build -p "${GO_BUILD_JOBS:-2}" -o "$OUT/$b" -ldflags "-s -w $ldflags" "k8s.io/kubernetes/cmd/$b"
  done
}

install_packages
if ! have_binaries; then
  build
  have_binaries || { log "the built kube-apiserver does not report v$VERSION"; exit 1; }
fi
echo "$OUT"
