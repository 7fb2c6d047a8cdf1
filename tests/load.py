"""Steady load through an OpenAI-compatible endpoint, counting every failure.

Used by `make demo` (to make the autoscaler act) and the end-to-end tests (to show that a rollout
fails no request). C workers send streaming chat completions back to back for D seconds; one JSON
line at the end: {"ok": N, "failed": N, "errors": [...first 5...], "ttft_p50": s, "ttft_p95": s}.
A request counts as failed on any HTTP error, a broken stream, or an empty answer.

Usage: python3 tests/load.py BASE_URL MODEL [--concurrency C] [--duration D] [--max-tokens N]
       [--progress SECONDS]
"""
import argparse
import asyncio
import json
import statistics
import sys
import time

import openai

PROMPTS = [
    "Name three rivers in Europe.",
    "What is the capital of France?",
    "Write one sentence about autumn.",
    "List the first five prime numbers.",
    "What colour is the sky on a clear day?",
    "Give a short tip for learning a language.",
]


async def worker(client, model, deadline, max_tokens, index, stats):
    n = index
    while time.monotonic() < deadline:
        prompt = PROMPTS[n % len(PROMPTS)]
        n += 1
        start = time.monotonic()
        first = None
        text = ""
        try:
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    if first is None:
                        first = time.monotonic() - start
                    text += chunk.choices[0].delta.content
            if not text:
                raise RuntimeError("empty answer")
            stats["ok"] += 1
            stats["ttft"].append(first)
        except Exception as e:  # every failure is counted, whatever its kind
            stats["failed"] += 1
            if len(stats["errors"]) < 5:
                stats["errors"].append(f"{type(e).__name__}: {e}"[:300])


async def progress(stats, every, deadline):
    start = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(every)
        recent = stats["ttft"][-20:]
        p = f"{statistics.median(recent):.2f}s" if recent else "-"
        print(
            f"  load: {time.monotonic() - start:4.0f}s  ok {stats['ok']}  failed {stats['failed']}"
            f"  recent TTFT p50 {p}",
            file=sys.stderr,
            flush=True,
        )


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base_url")
    ap.add_argument("model")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--duration", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--progress", type=float, default=0)
    args = ap.parse_args()
    client = openai.AsyncOpenAI(
        base_url=args.base_url.rstrip("/") + "/v1", api_key="none", max_retries=0, timeout=120
    )
    stats = {"ok": 0, "failed": 0, "errors": [], "ttft": []}
    deadline = time.monotonic() + args.duration
    tasks = [
        worker(client, args.model, deadline, args.max_tokens, i, stats)
        for i in range(args.concurrency)
    ]
    if args.progress > 0:
        tasks.append(progress(stats, args.progress, deadline))
    await asyncio.gather(*tasks)
    ttft = sorted(stats["ttft"])
    out = {
        "ok": stats["ok"],
        "failed": stats["failed"],
        "errors": stats["errors"],
        "ttft_p50": round(ttft[len(ttft) // 2], 3) if ttft else None,
        "ttft_p95": round(ttft[min(len(ttft) - 1, int(len(ttft) * 0.95))], 3) if ttft else None,
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
