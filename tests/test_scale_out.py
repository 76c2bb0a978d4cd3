"""Many relay processes on one PostgreSQL database: no work lost, none doubled.

Real processes on loopback: three `relay serve` nodes, the `relay fake-upstream` simulator and
a receiver process (bench/receiver.py), as users would run them.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.harness import Cluster, Proc, cluster, create_key
from tests.conftest import drop_pg_database, pg_url_for_new_database, sync_count

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(900)]

GENERATIONS = 2000
NODE_ENV = {
    "RELAY_UPSTREAM_API_KEY": "scale-key",
    "RELAY_ALLOW_PRIVATE_CALLBACKS": "true",
    "RELAY_POLL_MIN_INTERVAL": "0.5",
    "RELAY_POLL_MAX_INTERVAL": "2",
    "RELAY_UPSTREAM_MAX_RPS": "1000",
    "RELAY_UPSTREAM_TIMEOUT": "5",
    "RELAY_DELIVERY_TIMEOUT": "5",
    "RELAY_DELIVERY_RETRY_SCHEDULE": "0.5,1,2,4,8,8",
    "RELAY_RATE_LIMIT": "0",
    "RELAY_LEASE": "4",
    "RELAY_LOG_LEVEL": "WARNING",
}


@pytest.fixture
def pg_url() -> Iterator[str]:
    url = pg_url_for_new_database()
    yield url
    drop_pg_database(url)


def _start_nodes(c: Cluster, db_url: str, upstream: str, count: int) -> list[Proc]:
    env = {**NODE_ENV, "RELAY_DATABASE_URL": db_url, "RELAY_UPSTREAM_URL": upstream}
    nodes = [c.relay(f"relay-{i}", env) for i in range(count)]
    for node in nodes:
        node.start()
    return nodes


async def _subscribe_all(
    nodes: list[Proc], api_key: str, receiver_url: str, rng: random.Random
) -> list[tuple[str, str]]:
    """One to three subscriptions per generation, spread over the nodes; returns (sub, gen)."""
    plan = [
        (f"gen_scale_{i:05d}", f"{receiver_url}/cb/{i}/{j}")
        for i in range(GENERATIONS)
        for j in range(rng.randint(1, 3))
    ]
    headers = {"authorization": f"Bearer {api_key}"}
    limits = httpx.Limits(max_connections=48)
    created: list[tuple[str, str]] = []
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=30) as client:
        semaphore = asyncio.Semaphore(48)

        async def one(n: int, gen_id: str, url: str) -> None:
            async with semaphore:
                node = nodes[n % len(nodes)]
                for attempt in range(3):
                    try:
                        answer = await client.post(
                            f"{node.url}/v1/subscriptions",
                            json={"generation_id": gen_id, "callback_url": url},
                        )
                        break
                    except httpx.TransportError:
                        # A keep-alive connection closed under us: creates are idempotent,
                        # so retrying is what a client should do (200 if it had landed).
                        if attempt == 2:
                            raise
                assert answer.status_code in (200, 201), answer.text
                created.append((answer.json()["id"], gen_id))

        async with asyncio.timeout(400):
            await asyncio.gather(*(one(n, g, u) for n, (g, u) in enumerate(plan)))
    return created


def _make_generations(upstream_url: str, rng: random.Random) -> None:
    items = [
        {"id": f"gen_scale_{i:05d}", "family": "image", "final_at_s": rng.uniform(2.0, 12.0)}
        for i in range(GENERATIONS)
    ]
    answer = httpx.post(f"{upstream_url}/_fake/generations/bulk", json={"items": items}, timeout=60)
    assert answer.status_code == 201, answer.text


async def _wait_delivered(db_url: str, expected: int, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            delivered = await asyncio.to_thread(
                sync_count, db_url, "SELECT count(*) FROM subscriptions WHERE status = 'delivered'"
            )
            if delivered >= expected:
                return
            await asyncio.sleep(1)


def _run_scale(tmp_path: Path, db_url: str, kill_midway: bool) -> dict[str, Any]:
    rng = random.Random(42)
    with cluster(tmp_path / "procs") as c:
        upstream = c.fake_upstream(api_key="scale-key", seed=3)
        receiver = c.receiver()
        key = create_key(db_url)
        _make_generations(upstream.url, rng)
        nodes = _start_nodes(c, db_url, upstream.url, 3)
        created = asyncio.run(_subscribe_all(nodes, key["api_key"], receiver.url, rng))
        kill_at = None
        if kill_midway:
            asyncio.run(_wait_delivered(db_url, len(created) // 3, timeout_s=240))
            kill_at = time.time()
            nodes[1].kill(signal.SIGKILL)
        asyncio.run(_wait_delivered(db_url, len(created), timeout_s=300))
        stats = httpx.get(f"{receiver.url}/_stats", timeout=30).json()
        arrivals = httpx.get(f"{receiver.url}/_arrivals", timeout=60).json()
        for node in nodes:
            assert node.popen is not None
            if node is not nodes[1] or not kill_midway:
                assert node.popen.poll() is None, f"{node.name} died:\n{node.tail()}"
    not_final = sync_count(db_url, "SELECT count(*) FROM subscriptions WHERE status <> 'delivered'")
    return {
        "created": len(created),
        "stats": stats,
        "arrivals": arrivals,
        "kill_at": kill_at,
        "not_delivered": not_final,
    }


def test_three_nodes_deliver_everything_once(tmp_path: Path, pg_url: str) -> None:
    """Three nodes on one PostgreSQL database: every subscription delivered, no webhook-id twice."""
    result = _run_scale(tmp_path, pg_url, kill_midway=False)
    print(
        f"scale-out: {result['created']} subscriptions, receiver stats {result['stats']['total']}"
    )
    assert result["not_delivered"] == 0
    assert result["stats"]["unique"] == result["created"]
    assert result["stats"]["duplicates"] == []
    polls_per_generation = sync_count(pg_url, "SELECT max(poll_count) FROM generations")
    assert polls_per_generation < 40  # coalesced and backed off, not hammering


def test_killed_node_loses_nothing_and_duplicates_only_its_in_flight_work(
    tmp_path: Path, pg_url: str
) -> None:
    """SIGKILL one of three nodes midway: all delivered; duplicates only from its in-flight sends."""
    result = _run_scale(tmp_path, pg_url, kill_midway=True)
    stats = result["stats"]
    duplicates = set(stats["duplicates"])
    print(
        f"scale-out with a SIGKILL: {result['created']} subscriptions, {len(duplicates)} duplicates"
    )
    assert result["not_delivered"] == 0
    assert stats["unique"] == result["created"]
    assert stats["duplicates_with_other_body"] == []
    first_arrival: dict[str, float] = {}
    for webhook_id, _sub, at, _path in result["arrivals"]:
        first_arrival.setdefault(webhook_id, at)
    for webhook_id in duplicates:
        # Sent before the kill by the node that died before it could record the answer.
        assert first_arrival[webhook_id] <= result["kill_at"] + 0.5
        recorded = sync_count(
            pg_url,
            "SELECT count(*) FROM delivery_attempts WHERE webhook_id = "
            f"'{webhook_id}' AND status_code BETWEEN 200 AND 299",
        )
        arrived = sum(1 for a in result["arrivals"] if a[0] == webhook_id)
        assert recorded < arrived
