"""Closed-loop streaming load for scripts/sdk-bench.sh: CONCURRENCY clients each stream chat
completions of ITEMS chunks from MODEL for DURATION seconds; prints one JSON line with items/s,
requests/s and the median request time."""
import asyncio
import json
import statistics
import sys
import time

import httpx


async def one(client, url, model, items):
    body = {"model": model, "messages": [{"role": "user", "content": "go"}],
            "max_tokens": items, "stream": True}
    got = 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if '"content"' in line:
                    got += 1
    return got


async def main(base, model, concurrency, duration, items):
    url = f"{base}/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await one(client, url, model, items)  # warm up
        deadline = time.perf_counter() + duration
        totals = {"items": 0, "requests": 0, "errors": 0}
        latencies = []

        async def worker():
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    got = await one(client, url, model, items)
                except Exception:
                    totals["errors"] += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                totals["items"] += got
                totals["requests"] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    print(json.dumps({
        "concurrency": concurrency, "items_per_s": round(totals["items"] / elapsed),
        "requests_per_s": round(totals["requests"] / elapsed, 1), "errors": totals["errors"],
        "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
        "items_per_request": items,
    }))


if __name__ == "__main__":
    base, model, concurrency, duration, items = sys.argv[1:6]
    asyncio.run(main(base, model, int(concurrency), float(duration), int(items)))
