"""Scale: 100,000 pending generations in one relay process.

The rows are written in bulk by relay's store (store.seeding: 100,000 generations, one
subscription each), the simulator holds the same 100,000 as long-running videos, and one
`relay serve` process runs on top. Measured: the time of the claim query over 100,000 rows
(before relay starts); relay's RSS and CPU when idle (nothing due) and under load (everything
due, polled at the default RELAY_UPSTREAM_MAX_RPS of 50 and at 500).
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path

import httpx
import psutil

from bench.common import BENCH_SECRET_KEY, Results, drop_database, new_database
from bench.harness import cluster
from relay import store
from relay.database import open_database
from relay.store import seeding

UPSTREAM_KEY = "scale-bench"


async def seed(url: str, count: int) -> None:
    db = open_database(url, secret_key=BENCH_SECRET_KEY)
    key = await store.create_key(db, "scale")
    await seeding.add_polling_generations(
        db,
        key.id,
        {f"gen_scale_{i}": f"https://93.184.216.34/hooks/{i}" for i in range(count)},
        status="IN_PROGRESS",
        next_poll_at=db.now() + timedelta(hours=1),
    )
    await db.dispose()


async def time_claims(url: str, rounds: int = 20, batch: int = 200) -> tuple[float, float]:
    """Median and max ms of claiming `batch` due generations out of all of them due."""
    db = open_database(url, secret_key=BENCH_SECRET_KEY)
    await db.sync_clock()
    await seeding.schedule_all_polls(db, db.now() - timedelta(seconds=1))
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        await store.claim_due_generations(db, "bench-claim", batch, 30.0)
        timings.append((time.perf_counter() - started) * 1000)
    await seeding.schedule_all_polls(db, db.now() + timedelta(hours=1))
    await db.dispose()
    timings.sort()
    return timings[len(timings) // 2], timings[-1]


async def make_all_due(url: str) -> None:
    db = open_database(url, secret_key=BENCH_SECRET_KEY)
    await db.sync_clock()
    await seeding.schedule_all_polls(db, db.now())
    await db.dispose()


def _sample(pid: int, seconds: float) -> tuple[float, float]:
    """CPU % of one core and RSS MB of the process over `seconds`."""
    proc = psutil.Process(pid)
    before = proc.cpu_times()
    time.sleep(seconds)
    after = proc.cpu_times()
    cpu = (after.user + after.system - before.user - before.system) / seconds * 100
    return cpu, proc.memory_info().rss / 1e6


def run(results: Results, database: str, workdir: Path, quick: bool) -> None:
    count = 10_000 if quick else 100_000
    settle_s = 5 if quick else 15
    url = new_database(database, workdir)
    try:
        started = time.monotonic()
        asyncio.run(seed(url, count))
        seeded_s = time.monotonic() - started
        median_ms, max_ms = asyncio.run(time_claims(url))
        results.add(
            "scale",
            database,
            f"claim 200 due of {count:,} (median / max ms)",
            f"{median_ms:.1f} / {max_ms:.1f}",
            f"rows written in {seeded_s:.0f} s",
        )
        with cluster(workdir / f"scale-{database}") as c:
            upstream = c.fake_upstream(api_key=UPSTREAM_KEY, seed=5)
            items = [
                {"id": f"gen_scale_{i}", "family": "video", "queue_s": 0, "run_s": 36000}
                for i in range(count)
            ]
            for start in range(0, count, 20000):
                httpx.post(
                    f"{upstream.url}/_fake/generations/bulk",
                    json={"items": items[start : start + 20000]},
                    timeout=120,
                ).raise_for_status()
            for rps in (50, 500):
                env = {
                    "RELAY_DATABASE_URL": url,
                    "RELAY_UPSTREAM_URL": upstream.url,
                    "RELAY_UPSTREAM_API_KEY": UPSTREAM_KEY,
                    "RELAY_UPSTREAM_MAX_RPS": str(rps),
                    "RELAY_LOG_LEVEL": "WARNING",
                }
                node = c.relay(f"relay-{rps}", env).start()
                if rps == 50:
                    time.sleep(settle_s)
                    cpu, rss = _sample(node.pid, settle_s)
                    results.add(
                        "scale",
                        database,
                        f"idle: CPU % / RSS MB ({count:,} pending)",
                        f"{cpu:.1f} / {rss:.0f}",
                        "nothing due for an hour",
                    )
                asyncio.run(make_all_due(url))
                polls_before = httpx.get(f"{upstream.url}/_fake/stats", timeout=30).json()["polls"]
                time.sleep(3)
                sample_s = settle_s
                cpu, rss = _sample(node.pid, sample_s)
                polls = (
                    httpx.get(f"{upstream.url}/_fake/stats", timeout=30).json()["polls"]
                    - polls_before
                )
                results.add(
                    "scale",
                    database,
                    f"load at MAX_RPS={rps}: CPU % / RSS MB",
                    f"{cpu:.1f} / {rss:.0f}",
                    f"{polls / (sample_s + 3):.0f} polls/s over {count:,} due generations",
                )
                node.kill()
                asyncio.run(_release(url))
    finally:
        drop_database(url)


async def _release(url: str) -> None:
    """Forget the killed node's leases so the next run starts from the same state."""
    db = open_database(url, secret_key=BENCH_SECRET_KEY)
    await seeding.schedule_all_polls(db, db.now() + timedelta(hours=1))
    await db.dispose()
