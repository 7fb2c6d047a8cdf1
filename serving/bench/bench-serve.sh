#!/usr/bin/env bash
# Serves the same GGUF with llmo-serve and with llama.cpp's llama-server (parallel slots,
# continuous batching), drives both with bench/loadgen.py at concurrency 1, 4 and 16, and
# prints one table. Needs: python3 with `openai`, a release build of llmo-serve, and the
# llama-server binary (LLAMA_SERVER, default: built by bench/build-llama-server.sh).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
MODEL="${MODEL:-$("$ROOT/scripts/fetch-model.sh")}"
THREADS="${THREADS:-2}"
LLMO="${LLMO_SERVE:-${CARGO_TARGET_DIR:-$ROOT/target}/release/llmo-serve}"
LLAMA="${LLAMA_SERVER:-$("$HERE/build-llama-server.sh")}"
TRACE="${TRACE:-$ROOT/data/azure-2023-conv.csv}"
LEVELS="${LEVELS:-1 4 16}"
for b in "$LLMO" "$LLAMA"; do
    [[ -x "$b" ]] || { echo "missing binary $b (cargo build --release -p llmo-serve; bench/build-llama-server.sh)" >&2; exit 1; }
done
OUT="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; cp "$OUT"/*.log /tmp/ 2>/dev/null || true; rm -rf "$OUT"' EXIT

wait_ready() {
    for _ in $(seq 1 600); do
        curl -sf "$1" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "server at $1 did not become ready" >&2
    return 1
}

trace_arg=()
[[ -f "$TRACE" ]] && trace_arg=(--trace "$TRACE")

"$LLMO" --model "$MODEL" --served-name bench --port 18401 --host 127.0.0.1 --threads "$THREADS" \
    --max-running 16 --kv-cache-tokens 65536 >"$OUT/llmo.log" 2>&1 &
LLMO_PID=$!
wait_ready http://127.0.0.1:18401/ready
python3 "$HERE/loadgen.py" http://127.0.0.1:18401 bench --concurrency $LEVELS "${trace_arg[@]}" >"$OUT/llmo.jsonl"
kill "$LLMO_PID"; wait "$LLMO_PID" 2>/dev/null || true

"$LLAMA" -m "$MODEL" -t "$THREADS" -np 16 -c 32768 --port 18402 --host 127.0.0.1 -a bench \
    >"$OUT/llama.log" 2>&1 &
LLAMA_PID=$!
wait_ready http://127.0.0.1:18402/health
python3 "$HERE/loadgen.py" http://127.0.0.1:18402 bench --concurrency $LEVELS "${trace_arg[@]}" >"$OUT/llama.jsonl"
kill "$LLAMA_PID"; wait "$LLAMA_PID" 2>/dev/null || true

python3 - "$OUT/llmo.jsonl" "$OUT/llama.jsonl" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
print("| conc | server | TTFT p50 s | TTFT p95 s | ITL p50 ms | output tok/s |")
print("|---:|---|---:|---:|---:|---:|")
for x, y in zip(a, b):
    for name, r in (("llmo-serve", x), ("llama.cpp", y)):
        print(f"| {r['concurrency']} | {name} | {r['ttft_p50_s']} | {r['ttft_p95_s']} | {r['itl_p50_ms']} | {r['output_tok_s']} |")
    print(f"| {x['concurrency']} | llmo ÷ llama.cpp | {x['ttft_p50_s']/y['ttft_p50_s']:.2f} | {x['ttft_p95_s']/y['ttft_p95_s']:.2f} | {x['itl_p50_ms']/y['itl_p50_ms']:.2f} | {x['output_tok_s']/y['output_tok_s']:.2f} |")
PY
