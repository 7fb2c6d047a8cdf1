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
# llmo-serve's weight formats to run: `auto` (f32 for this model: the file's exact outputs),
# `int8` (the W8A8 kernel) and `int4` (the W4A8 kernel on the file's own Q4_1 blocks, as
# llama.cpp runs them); both round activations to 8 bits, as llama.cpp's Q4_1 × Q8_1 does.
QUANTS="${QUANTS:-auto int8 int4}"
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

for q in $QUANTS; do
    "$LLMO" --model "$MODEL" --served-name bench --port 18401 --host 127.0.0.1 --threads "$THREADS" \
        --quantization "$q" --max-running 16 --kv-cache-tokens 65536 >"$OUT/llmo-$q.log" 2>&1 &
    LLMO_PID=$!
    wait_ready http://127.0.0.1:18401/ready
    python3 "$HERE/loadgen.py" http://127.0.0.1:18401 bench --concurrency $LEVELS "${trace_arg[@]}" \
        >"$OUT/llmo-$q.jsonl"
    kill "$LLMO_PID"; wait "$LLMO_PID" 2>/dev/null || true
done

"$LLAMA" -m "$MODEL" -t "$THREADS" -np 16 -c 32768 --port 18402 --host 127.0.0.1 -a bench \
    >"$OUT/llama.log" 2>&1 &
LLAMA_PID=$!
wait_ready http://127.0.0.1:18402/health
python3 "$HERE/loadgen.py" http://127.0.0.1:18402 bench --concurrency $LEVELS "${trace_arg[@]}" >"$OUT/llama.jsonl"
kill "$LLAMA_PID"; wait "$LLAMA_PID" 2>/dev/null || true

python3 - "$OUT/llama.jsonl" $(for q in $QUANTS; do echo "$q=$OUT/llmo-$q.jsonl"; done) <<'PY'
import json, sys
load = lambda f: [json.loads(l) for l in open(f)]
base = load(sys.argv[1])
runs = [(a.split("=", 1)[0], load(a.split("=", 1)[1])) for a in sys.argv[2:]]
print("| conc | server | TTFT p50 s | TTFT p95 s | ITL p50 ms | output tok/s |")
print("|---:|---|---:|---:|---:|---:|")
for i, y in enumerate(base):
    c = y["concurrency"]
    print(f"| {c} | llama.cpp | {y['ttft_p50_s']} | {y['ttft_p95_s']} | {y['itl_p50_ms']} | {y['output_tok_s']} |")
    for q, rows in runs:
        x = rows[i]
        print(f"| {c} | llmo-serve {q} | {x['ttft_p50_s']} | {x['ttft_p95_s']} | {x['itl_p50_ms']} | {x['output_tok_s']} |")
    for q, rows in runs:
        x = rows[i]
        print(f"| {c} | llmo {q} ÷ llama.cpp | {x['ttft_p50_s']/y['ttft_p50_s']:.2f} | {x['ttft_p95_s']/y['ttft_p95_s']:.2f} | {x['itl_p50_ms']/y['itl_p50_ms']:.2f} | {x['output_tok_s']/y['output_tok_s']:.2f} |")
PY
