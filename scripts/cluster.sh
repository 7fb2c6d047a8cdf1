#!/usr/bin/env bash
# A real Kubernetes control plane on loopback: etcd, kube-apiserver (RBAC on),
# kube-controller-manager and kube-scheduler v1.20.2, from scripts/k8s-build.sh.
#
#   scripts/cluster.sh up      start (idempotent); prints `export KUBECONFIG=...`
#   scripts/cluster.sh down    stop every process and remove the state
#   scripts/cluster.sh status  say what runs
#
# State lives in $LLMO_CLUSTER_DIR (default ~/.cache/llmo/cluster); logs in its logs/ folder.
set -euo pipefail

CACHE="${LLMO_CACHE:-$HOME/.cache/llmo}"
DIR="${LLMO_CLUSTER_DIR:-$CACHE/cluster}"
API_PORT="${LLMO_API_PORT:-16443}"
ETCD_PORT="${LLMO_ETCD_PORT:-12379}"
HERE="$(cd "$(dirname "$0")" && pwd)"

log() { printf '[cluster] %s\n' "$*" >&2; }

pidfile() { echo "$DIR/run/$1.pid"; }

running() {
  local p
  p=$(cat "$(pidfile "$1")" 2>/dev/null) || return 1
  kill -0 "$p" 2>/dev/null
}

start() { # name, command...
  local name=$1; shift
  if running "$name"; then return; fi
  nohup "$@" >"$DIR/logs/$name.log" 2>&1 &
  echo $! >"$(pidfile "$name")"
}

wait_for() { # what, seconds, command...
  local what=$1 seconds=$2; shift 2
  for _ in $(seq 1 $((seconds * 4))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  log "$what did not come up within ${seconds}s; see $DIR/logs/"
  return 1
}

up() {
  local bin
  bin=$("$HERE/k8s-build.sh")
  mkdir -p "$DIR"/{run,logs,pki,etcd}
  if [[ ! -f "$DIR/pki/sa.key" ]]; then
    openssl genrsa -out "$DIR/pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$DIR/pki/sa.key" -pubout -out "$DIR/pki/sa.pub" 2>/dev/null
    echo "llmo-admin-token,admin,admin,system:masters" >"$DIR/pki/tokens.csv"
  fi
  start etcd etcd --data-dir "$DIR/etcd" --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-cluster "default=http://127.0.0.1:$((ETCD_PORT + 1))" --name default
  wait_for etcd 30 curl -sf "http://127.0.0.1:$ETCD_PORT/health"
  start kube-apiserver "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
    --cert-dir "$DIR/pki" --token-auth-file "$DIR/pki/tokens.csv" --authorization-mode RBAC \
    --service-account-key-file "$DIR/pki/sa.pub" --service-account-signing-key-file "$DIR/pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc --service-cluster-ip-range 10.96.0.0/16 \
    --allow-privileged=false --enable-admission-plugins NamespaceLifecycle,ServiceAccount,DefaultStorageClass
  cat >"$DIR/kubeconfig" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: llmo
  cluster: {server: "https://127.0.0.1:$API_PORT", insecure-skip-tls-verify: true}
users:
- name: admin
  user: {token: llmo-admin-token}
contexts:
- name: llmo
  context: {cluster: llmo, user: admin}
current-context: llmo
KCFG
  wait_for kube-apiserver 60 kubectl --kubeconfig "$DIR/kubeconfig" get --raw /readyz
  start kube-controller-manager "$bin/kube-controller-manager" --kubeconfig "$DIR/kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 0 --port 0 --leader-elect=false \
    --service-account-private-key-file "$DIR/pki/sa.key" --root-ca-file "$DIR/pki/apiserver.crt" \
    --use-service-account-credentials --controllers '*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-csrsigning,-csrapproving,-csrcleaner,-bootstrapsigner,-tokencleaner,-persistentvolume-binder,-attachdetach,-ttl'
  start kube-scheduler "$bin/kube-scheduler" --kubeconfig "$DIR/kubeconfig" --bind-address 127.0.0.1 \
    --secure-port 0 --port 0 --leader-elect=false
  wait_for "the default service account" 60 kubectl --kubeconfig "$DIR/kubeconfig" -n default get serviceaccount default
  log "up: kube-apiserver v1.20.2 on https://127.0.0.1:$API_PORT"
  echo "export KUBECONFIG=$DIR/kubeconfig"
}

down() {
  for name in kube-scheduler kube-controller-manager kube-apiserver etcd; do
    if running "$name"; then
      kill "$(cat "$(pidfile "$name")")" 2>/dev/null || true
    fi
  done
  for name in kube-scheduler kube-controller-manager kube-apiserver etcd; do
    local p
    p=$(cat "$(pidfile "$name")" 2>/dev/null) || continue
    for _ in $(seq 1 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$p" 2>/dev/null || true
  done
  rm -rf "$DIR"
  log "down"
}

status() {
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler; do
    if running "$name"; then echo "$name: running"; else echo "$name: stopped"; fi
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
