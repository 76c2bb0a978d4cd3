"""Many relay processes on one PostgreSQL database: no work lost, none doubled.

Real processes on loopback: three `relay serve` nodes, the `relay fake-upstream` simulator and
a receiver process (tests/callback_sink.py), as users would run them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay import migrate
from tests.helpers import (
    ROOT,
    drop_pg_database,
    free_port,
    log_tail,
    new_key,
    pg_url_for_new_database,
    process,
    relay_process,
    sync_count,
)

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(900)]

GENERATIONS = 2000
UPSTREAM_KEY = "scale-key"
NODE_ENV = {
    "RELAY_UPSTREAM_API_KEY": UPSTREAM_KEY,
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
STARTUP_TIMEOUT_S = 30.0


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A new PostgreSQL database at the latest schema, dropped afterwards."""
    url = pg_url_for_new_database()
    try:
        migrate.upgrade(url)
        yield url
    finally:
        drop_pg_database(url)


@contextlib.asynccontextmanager
async def _upstream_and_sink(logs: Path) -> AsyncIterator[tuple[str, str]]:
    """The simulator and the callback sink as processes; yields their base URLs."""
    upstream_port, sink_port = free_port(), free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    sink_url = f"http://127.0.0.1:{sink_port}"
    upstream_args = [sys.executable, "-m", "relay.cli", "fake-upstream", "--port"]
    upstream_env = {
        "RELAY_FAKE_API_KEY": UPSTREAM_KEY,
        "RELAY_FAKE_SEED": "3",
        "RELAY_FAKE_TIME_SCALE": "1",
    }
    sink_args = [sys.executable, "-m", "tests.callback_sink", "--port", str(sink_port)]
    async with (
        process(
            [*upstream_args, str(upstream_port)],
            upstream_env,
            logs / "fake-upstream.log",
            f"{upstream_url}/_fake/stats",
            STARTUP_TIMEOUT_S,
        ),
        process(
            sink_args,
            {},
            logs / "sink.log",
            f"{sink_url}/_arrivals",
            STARTUP_TIMEOUT_S,
            cwd=ROOT,  # `-m tests.callback_sink` imports from the checkout
        ),
    ):
        yield upstream_url, sink_url


async def _subscribe_all(
    node_urls: list[str], api_key: str, receiver_url: str, rng: random.Random
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
                node_url = node_urls[n % len(node_urls)]
                for attempt in range(3):
                    try:
                        answer = await client.post(
                            f"{node_url}/v1/subscriptions",
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


async def _make_generations(upstream_url: str, rng: random.Random) -> None:
    items = [
        {"id": f"gen_scale_{i:05d}", "family": "image", "final_at_s": rng.uniform(2.0, 12.0)}
        for i in range(GENERATIONS)
    ]
    async with httpx.AsyncClient(timeout=60) as client:
        answer = await client.post(f"{upstream_url}/_fake/generations/bulk", json={"items": items})
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


async def _scale(logs: Path, db_url: str, kill_midway: bool) -> dict[str, Any]:
    """Three nodes deliver GENERATIONS generations' callbacks; the second one is SIGKILLed
    a third of the way through if `kill_midway`. Returns what the sink received."""
    rng = random.Random(42)
    node_env = {**NODE_ENV, "RELAY_DATABASE_URL": db_url}
    async with contextlib.AsyncExitStack() as stack:
        upstream_url, sink_url = await stack.enter_async_context(_upstream_and_sink(logs))
        key = await new_key(db_url)
        await _make_generations(upstream_url, rng)
        env = {**node_env, "RELAY_UPSTREAM_URL": upstream_url}
        nodes = [
            await stack.enter_async_context(
                relay_process(env, logs / f"relay-{i}.log", STARTUP_TIMEOUT_S)
            )
            for i in range(3)
        ]
        node_urls = [url for _, url in nodes]
        created = await _subscribe_all(node_urls, key.api_key, sink_url, rng)
        kill_at = None
        if kill_midway:
            await _wait_delivered(db_url, len(created) // 3, timeout_s=240)
            kill_at = time.time()
            killed = nodes[1][0]
            killed.send_signal(signal.SIGKILL)
            async with asyncio.timeout(15):
                await killed.wait()
        await _wait_delivered(db_url, len(created), timeout_s=300)
        async with httpx.AsyncClient(timeout=60) as client:
            arrivals = (await client.get(f"{sink_url}/_arrivals")).json()
        for i, (proc, _) in enumerate(nodes):
            if i != 1 or not kill_midway:
                assert proc.returncode is None, (
                    f"relay-{i} died:\n{log_tail(logs / f'relay-{i}.log')}"
                )
    return {"created": len(created), "arrivals": arrivals, "kill_at": kill_at}


def _run_scale(tmp_path: Path, db_url: str, kill_midway: bool) -> dict[str, Any]:
    logs = tmp_path / "procs"
    logs.mkdir()
    result = asyncio.run(_scale(logs, db_url, kill_midway))
    seen = Counter(webhook_id for webhook_id, _at, _digest in result["arrivals"])
    digests: dict[str, set[str]] = {}
    for webhook_id, _at, digest in result["arrivals"]:
        digests.setdefault(webhook_id, set()).add(digest)
    result["unique"] = len(seen)
    result["duplicates"] = sorted(w for w, n in seen.items() if n > 1)
    result["duplicates_with_other_body"] = sorted(w for w, d in digests.items() if len(d) > 1)
    result["not_delivered"] = sync_count(
        db_url, "SELECT count(*) FROM subscriptions WHERE status <> 'delivered'"
    )
    return result


def test_three_nodes_deliver_everything_once(tmp_path: Path, pg_url: str) -> None:
    """Three nodes on one PostgreSQL database: every subscription delivered, no webhook-id twice."""
    result = _run_scale(tmp_path, pg_url, kill_midway=False)
    print(f"scale-out: {result['created']} subscriptions, {len(result['arrivals'])} callbacks")
    assert result["not_delivered"] == 0
    assert result["unique"] == result["created"]
    assert result["duplicates"] == []
    polls_per_generation = sync_count(pg_url, "SELECT max(poll_count) FROM generations")
    assert polls_per_generation < 40  # coalesced and backed off, not hammering


def test_killed_node_loses_nothing_and_duplicates_only_its_in_flight_work(
    tmp_path: Path, pg_url: str
) -> None:
    """SIGKILL one of three nodes midway: all delivered; duplicates only from its in-flight sends."""
    result = _run_scale(tmp_path, pg_url, kill_midway=True)
    duplicates = set(result["duplicates"])
    print(
        f"scale-out with a SIGKILL: {result['created']} subscriptions, {len(duplicates)} duplicates"
    )
    assert result["not_delivered"] == 0
    assert result["unique"] == result["created"]
    assert result["duplicates_with_other_body"] == []
    first_arrival: dict[str, float] = {}
    for webhook_id, at, _digest in result["arrivals"]:
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
