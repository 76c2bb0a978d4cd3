"""A load generator in its own process: POST subscriptions for `duration` seconds.

    python -m bench.loadgen URL KEYS_CSV CONCURRENCY DURATION_S RUN_TAG

Prints one JSON line: requests, errors, statuses, rate and latency percentiles (ms).
Callback URLs use a public literal IP, so relay's private-address rule runs and passes
without DNS.
"""

from __future__ import annotations

import asyncio
import sys
import time

import aiohttp
import orjson


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(url: str, keys: list[str], concurrency: int, duration_s: float, tag: str) -> None:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = 0
    deadline = time.perf_counter() + duration_s

    async def worker(session: aiohttp.ClientSession, worker_id: int) -> None:
        nonlocal counter
        while time.perf_counter() < deadline:
            counter += 1
            n = counter
            key = keys[n % len(keys)]
            body = orjson.dumps(
                {
                    "generation_id": f"gen_{tag}_{n}",
                    "callback_url": f"https://93.184.216.34/hooks/{worker_id}/{n}",
                    "metadata": {"n": n},
                }
            )
            started = time.perf_counter()
            async with session.post(
                url,
                data=body,
                headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
            ) as response:
                await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1
            latencies.append((time.perf_counter() - started) * 1000)

    connector = aiohttp.TCPConnector(limit=concurrency)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session, i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    ok = statuses.get(201, 0)
    print(
        orjson.dumps(
            {
                "requests": len(latencies),
                "created": ok,
                "statuses": {str(k): v for k, v in statuses.items()},
                "rate": ok / elapsed,
                "p50_ms": percentile(latencies, 0.50),
                "p99_ms": percentile(latencies, 0.99),
            }
        ).decode()
    )


if __name__ == "__main__":
    import uvloop

    url, keys_csv, concurrency, duration_s, tag = sys.argv[1:6]
    uvloop.run(main(url, keys_csv.split(","), int(concurrency), float(duration_s), tag))
