"""Closed-loop load generator for OpenAI-compatible servers (llmo-serve, llama.cpp's llama-server).

For each concurrency level, C workers each send requests back to back over streaming
/v1/completions. Prompt and output lengths are drawn (seeded) from the Azure LLM inference trace
2023 (conversation), capped to fit a small CPU model. Prints one JSON line per level with
TTFT p50/p95, inter-token latency p50 and output tokens/s.

Usage: python3 loadgen.py BASE_URL MODEL --concurrency 1 4 16 [--trace FILE]
"""
import argparse
import asyncio
import csv
import json
import random
import statistics
import time

import openai

FILLER = (
    "The river begins as a thin stream of melted snow high in the mountains. In spring the water "
    "is cold and clear, and it runs quickly over smooth grey stones. Farther down the valley, small "
    "creeks join it from both sides, and by the time it reaches the first village it is wide enough "
    "for a wooden bridge. Children fish from the bridge in summer, and farmers lead their cattle to "
    "drink along its muddy banks. "
).split()


def workload(trace, n, max_prompt, max_output, seed):
    rng = random.Random(seed)
    rows = []
    if trace:
        with open(trace) as f:
            for r in csv.DictReader(f):
                rows.append((int(r["ContextTokens"]), int(r["GeneratedTokens"])))
    else:
        rows = [(1020, 129)]
    out = []
    for i in range(n):
        ctx, gen = rng.choice(rows)
        # the trace is for large models; scale prompts down by 4 to suit a 2-core CPU, keep shape
        ctx = max(16, min(max_prompt, ctx // 4))
        gen = max(8, min(max_output, gen))
        words = int(ctx / 1.3)
        start = rng.randrange(len(FILLER))
        text = " ".join(FILLER[(start + j) % len(FILLER)] for j in range(words))
        out.append((f"Request {i}. {text}", gen))
    return out


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def one(base, model, prompt, max_tokens, ttfts, itls, counts):
    # A fresh connection per request: a server closing an idle keep-alive connection must not
    # turn into a failed request.
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=900)
    t0 = time.perf_counter()
    last = None
    n = 0
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    async for chunk in stream:
        if getattr(chunk, "usage", None):
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            now = time.perf_counter()
            if last is None:
                ttfts.append(now - t0)
            else:
                itls.append(now - last)
            last = now
            n += 1
    counts.append(usage if usage else n)
    await client.close()


async def level(base, model, c, jobs):
    queue = list(jobs)
    ttfts, itls, counts = [], [], []

    async def worker():
        while queue:
            prompt, gen = queue.pop()
            await one(base, model, prompt, gen, ttfts, itls, counts)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(c)))
    wall = time.perf_counter() - t0
    return {
        "concurrency": c,
        "requests": len(counts),
        "output_tokens": sum(counts),
        "wall_s": round(wall, 2),
        "ttft_p50_s": round(pct(ttfts, 50), 3),
        "ttft_p95_s": round(pct(ttfts, 95), 3),
        "itl_p50_ms": round(1000 * pct(itls, 50), 1),
        "output_tok_s": round(sum(counts) / wall, 1),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("model")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--trace")
    ap.add_argument("--requests-per-worker", type=int, default=2)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--max-output", type=int, default=128)
    a = ap.parse_args()
    for c in a.concurrency:
        n = max(4, c * a.requests_per_worker)
        jobs = workload(a.trace, n, a.max_prompt, a.max_output, seed=c)
        print(json.dumps(asyncio.run(level(a.base, a.model, c, jobs))), flush=True)


if __name__ == "__main__":
    main()
