"""Hint intake: how many signed upstream webhooks one relay process takes in a second.

One `relay serve` with RELAY_UPSTREAM_WEBHOOK_SECRET set (the simulator as its upstream, never
called: an intake answers without it), and a sender in this process posting signed
`task.started` webhooks for distinct ids nobody watches (each one remembered: a row in
upstream_webhooks and one in upstream_hints), with 8 and then 64 in flight, as a webhook
service with that much parallelism would. Each webhook is signed as the simulator signs its
own (relay/simulator/webhook_settings.py).

Measured: webhooks answered 204 per second, and the answer's latency p50 / p99. What a burst
of 1,000 creates asks of the intake (created, started and terminal events: ~3,000 within a
second or two) is read against it in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from pathlib import Path

import aiohttp
import orjson

from bench.common import Results, drop_database, new_database
from bench.e2e import relay_env
from bench.harness import cluster
from bench.loadgen import percentile
from relay.simulator.webhook_settings import event_payload, signature_header

SECRET_KEY = b"benchmark hint intake key 24"
SECRET = "whsec_" + base64.b64encode(SECRET_KEY).decode()
SIMULATOR_KEY = "sim-hints-key"
FULL_RUNS = ((8, 3000), (64, 6000))  # (in flight, webhooks)
QUICK_RUNS = ((8, 500), (64, 1000))


def run(results: Results, database: str, workdir: Path, quick: bool) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    url = new_database(database, workdir)
    try:
        with cluster(workdir / f"hints-{database}") as c:
            simulator = c.fake_upstream(SIMULATOR_KEY).start()
            env = relay_env(url, simulator.url, SIMULATOR_KEY)
            relay = c.relay("relay", {**env, "RELAY_UPSTREAM_WEBHOOK_SECRET": SECRET}).start()
            intake = f"{relay.url}/v1/upstream/webhook"
            for in_flight, count in QUICK_RUNS if quick else FULL_RUNS:
                rate, latencies = asyncio.run(_send(intake, in_flight, count))
                results.add(
                    "hints",
                    database,
                    f"webhooks/s taken in ({in_flight} in flight)",
                    f"{rate:.0f}",
                    f"{count} signed task.started webhooks, distinct ids nobody watches",
                )
                p50, p99 = (percentile(latencies, q) * 1000 for q in (0.5, 0.99))
                results.add(
                    "hints",
                    database,
                    f"answer p50 / p99 ms ({in_flight} in flight)",
                    f"{p50:.1f} / {p99:.1f}",
                )
    finally:
        drop_database(url)


async def _send(url: str, in_flight: int, count: int) -> tuple[float, list[float]]:
    """Post `count` signed webhooks, `in_flight` at a time; the rate and each answer's time."""
    tag = uuid.uuid4().hex[:8]
    latencies: list[float] = []
    next_index = iter(range(count))
    async with aiohttp.ClientSession() as session:

        async def sender() -> None:
            for i in next_index:
                msg_id = f"msg_{tag}_{i}"
                gen_id = f"gen_{tag}_{i}"
                payload = event_payload(
                    "task.started",
                    msg_id,
                    gen_id,
                    "IN_PROGRESS",
                    "fake/video",
                    "data.prediction.id",
                )
                body = orjson.dumps(payload)
                timestamp = int(time.time())
                headers = {
                    "content-type": "application/json",
                    "webhook-id": msg_id,
                    "webhook-timestamp": str(timestamp),
                    "webhook-signature": signature_header([SECRET_KEY], msg_id, timestamp, body),
                }
                started = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 204:
                        raise RuntimeError(f"hint refused: {response.status}")
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(in_flight)))
        elapsed = time.perf_counter() - started
    return count / elapsed, latencies
