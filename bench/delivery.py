"""Delivery: callbacks per second sustained from a backlog of final results.

A backlog of N subscriptions to generations already final (written through relay's own store,
so each gets its delivery queued as a late registration), then one `relay serve --role
worker` process drains it into a receiver process reached as ten different hosts
(127.0.0.1-10). Run three times: every receiver fast; then one host in ten hanging until the
delivery timeout (10% of the backlog is for it); then the same host holding half the backlog,
which shows what a dead receiver's large backlog costs the others. The rate is measured at
the receiver, on the fast hosts only.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import orjson

from bench.common import (
    BENCH_SECRET_KEY,
    Results,
    drop_database,
    metrics_env,
    new_database,
    scraping,
)
from bench.harness import cluster
from relay import store
from relay.database import open_database
from relay.store import seeding

HOSTS = 10
BODY = {
    "id": "",
    "status": "COMPLETED",
    "input": {"prompt": "a cat", "aspect_ratio": "1:1"},
    "data": {
        "type": "image",
        "images": [{"url": "https://cdn.example.com/x.png", "width": 1024}],
        "pad": "x" * 300,
    },
    "usage": {"total": 20, "subscription": 20, "permanent": 0},
}


async def make_backlog(
    url: str, count: int, receiver_port: int, hanging_share: float, tag: str
) -> int:
    """Queue `count` deliveries, interleaved; `hanging_share` of them go to host 10, which
    hangs (with none, all ten hosts are fast). Returns how many go to fast hosts."""
    db = open_database(url, secret_key=BENCH_SECRET_KEY)
    key = await store.create_key(db, f"delivery-{tag}")
    results = {
        f"gen_{tag}_{i}": orjson.dumps(dict(BODY, id=f"gen_{tag}_{i}")).decode()
        for i in range(count)
    }
    await seeding.add_final_generations(db, results)
    key_hash = store.hash_api_key(key.api_key)
    fast = 0
    requests = []
    hanging_per_100 = round(hanging_share * 100)
    fast_hosts = HOSTS - 1 if hanging_per_100 else HOSTS
    for i in range(count):
        hang = i % 100 < hanging_per_100
        host = HOSTS if hang else 1 + i % fast_hosts
        fast += not hang
        callback = f"http://127.0.0.{host}:{receiver_port}/{'hang' if hang else 'ok'}/{i}"
        requests.append(store.CreateRequest(key_hash, f"gen_{tag}_{i}", callback, None))
    for start in range(0, count, 500):
        await store.create_subscriptions(db, requests[start : start + 500])
    await db.dispose()
    return fast


def _drain(
    results: Results,
    database: str,
    workdir: Path,
    count: int,
    hanging_share: float,
    metrics: bool = False,
) -> float:
    url = new_database(database, workdir)
    label = f"{hanging_share:.0%} to a hanging host" if hanging_share else "all fast"
    label += ", metrics on" if metrics else ""
    try:
        with cluster(workdir / f"delivery-{database}-{hanging_share}-{metrics}") as c:
            receiver = c.receiver(host="0.0.0.0")
            port = int(receiver.url.rsplit(":", 1)[1])
            fast = asyncio.run(make_backlog(url, count, port, hanging_share, "d"))
            env = {
                "RELAY_DATABASE_URL": url,
                "RELAY_UPSTREAM_API_KEY": "unused",
                "RELAY_UPSTREAM_URL": "http://127.0.0.1:9",
                "RELAY_ALLOW_PRIVATE_CALLBACKS": "true",
                "RELAY_LOG_LEVEL": "WARNING",
                **metrics_env(metrics),
            }
            started = time.time()
            node = c.relay("relay", env, role="worker").start()
            deadline = time.monotonic() + 600
            total = 0
            with scraping(node.url if metrics else None):
                while time.monotonic() < deadline:
                    total = httpx.get(f"{receiver.url}/_stats", timeout=30).json()["total"]
                    if total >= fast:
                        break
                    time.sleep(0.5)
            arrivals = httpx.get(f"{receiver.url}/_arrivals", timeout=60).json()
    finally:
        drop_database(url)
    times: list[float] = sorted(a[2] for a in arrivals if "/ok/" in a[3])
    if len(times) < fast:
        results.add(
            "delivery",
            database,
            f"callbacks/s ({label})",
            "incomplete",
            f"{len(times)}/{fast} arrived",
        )
        return 0.0
    rate = len(times) / (times[-1] - times[0])
    first_s = times[0] - started
    results.add(
        "delivery",
        database,
        f"callbacks/s ({label})",
        f"{rate:.0f}",
        f"{fast} callbacks to fast hosts of {count}; first arrived {first_s:.1f} s after start",
    )
    return rate


def run(results: Results, database: str, workdir: Path, quick: bool, metrics: bool = False) -> None:
    count = 3000 if quick else 20000
    fast_rate = _drain(results, database, workdir, count, hanging_share=0.0)
    if metrics:
        on_rate = _drain(results, database, workdir, count, hanging_share=0.0, metrics=True)
        if fast_rate:
            results.add(
                "delivery",
                database,
                "metrics on / off (all fast)",
                f"{on_rate / fast_rate:.0%}",
                "RELAY_ADMIN_TOKEN set, /metrics scraped every second",
            )
    for share in (0.1, 0.5):
        hanging_rate = _drain(results, database, workdir, count, hanging_share=share)
        if fast_rate:
            results.add(
                "delivery",
                database,
                f"rate with {share:.0%} to a hanging host / all fast",
                f"{hanging_rate / fast_rate:.0%}",
                "the hanging host answers nothing until RELAY_DELIVERY_TIMEOUT (15 s)",
            )
