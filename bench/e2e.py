"""End to end: from the moment the simulator turns a generation final to the callback's arrival.

One relay process (`--role all`, RELAY_POLL_MIN_INTERVAL=0.5, RELAY_POLL_MAX_INTERVAL=2,
RELAY_UPSTREAM_MAX_RPS=1000 so the cap never throttles, RELAY_RATE_LIMIT=0), the upstream
simulator and one callback receiver, each its own process. Generations turn final at a steady
rate (20/s for 30 s; quick: 10/s for 8 s): generation i is final at `start + i / rate` and is
created 2-4 s before that, then subscribed to through the API at once, so a steady population
of pending generations is being polled while the finals arrive.

For each generation, from the simulator's final time (`final_at`), its poll times and the
receiver's arrival time:

- end to end = arrival - final_at;
- detection = first poll at or after final_at - final_at (what the poll interval costs);
- beyond detection = arrival - that poll (relay's own work: record the poll, queue and send
  the callback); the target is p99 <= 250 ms.

The helpers below drive any scenario that goes simulator -> relay -> receiver; bench/cost.py
uses them too.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.common import Results, drop_database, new_database
from bench.harness import cluster, create_key
from bench.loadgen import percentile

FULL_RATE_PER_S, FULL_DURATION_S = 20.0, 30.0
QUICK_RATE_PER_S, QUICK_DURATION_S = 10.0, 8.0
LIFETIME_S = (2.0, 4.0)  # each generation is created this long before it turns final
POLL_MIN_S, POLL_MAX_S = 0.5, 2.0
TARGET_BEYOND_P99_MS = 250.0
SIMULATOR_KEY = "sim-e2e-key"


# --- helpers shared with bench/cost.py ---------------------------------------------------------


def relay_env(
    database_url: str, upstream_url: str, upstream_key: str, **extra: str
) -> dict[str, str]:
    """A relay process's environment for benchmarks: loopback callbacks, no API rate limit."""
    return {
        "RELAY_DATABASE_URL": database_url,
        "RELAY_UPSTREAM_URL": upstream_url,
        "RELAY_UPSTREAM_API_KEY": upstream_key,
        "RELAY_ALLOW_PRIVATE_CALLBACKS": "true",
        "RELAY_RATE_LIMIT": "0",
        "RELAY_LOG_LEVEL": "WARNING",
        **extra,
    }


async def create_generations(
    session: aiohttp.ClientSession, simulator_url: str, specs: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """Create scripted generations in the simulator; returns each id's final_at (unix s)."""
    async with session.post(
        f"{simulator_url}/_fake/generations/bulk", json={"items": list(specs)}
    ) as response:
        if response.status != 201:
            raise RuntimeError(
                f"simulator refused generations: {response.status} {await response.text()}"
            )
        body = await response.json()
    return {item["id"]: float(item["final_at"]) for item in body["items"]}


async def subscribe(
    session: aiohttp.ClientSession,
    relay_url: str,
    api_key: str,
    generation_id: str,
    callback_url: str,
) -> None:
    """POST one subscription; raises unless relay answers 201."""
    async with session.post(
        f"{relay_url}/v1/subscriptions",
        json={"generation_id": generation_id, "callback_url": callback_url},
        headers={"authorization": f"Bearer {api_key}"},
    ) as response:
        if response.status != 201:
            raise RuntimeError(f"subscription refused: {response.status} {await response.text()}")
        await response.read()


async def wait_for_arrivals(
    session: aiohttp.ClientSession, receiver_url: str, expected: int, deadline: float
) -> list[list[Any]]:
    """The receiver's arrivals once `expected` have come or at `deadline` (monotonic), whichever
    is first: [[webhook_id, subscription_id, unix_time, path], ...]."""
    while True:
        async with session.get(f"{receiver_url}/_stats") as response:
            total = int((await response.json())["total"])
        if total >= expected or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.25)
    async with session.get(f"{receiver_url}/_arrivals") as response:
        arrivals: list[list[Any]] = await response.json()
    return arrivals


async def fetch_poll_times(
    session: aiohttp.ClientSession, simulator_url: str, ids: Iterable[str], concurrency: int = 32
) -> dict[str, list[float]]:
    """Every poll time (unix s) the simulator recorded for each id."""
    gate = asyncio.Semaphore(concurrency)

    async def one(gen_id: str) -> tuple[str, list[float]]:
        async with (
            gate,
            session.get(f"{simulator_url}/_fake/generations/{gen_id}/polls") as response,
        ):
            body = await response.json()
        return gen_id, [float(t) for t in body["times"]]

    return dict(await asyncio.gather(*(one(gen_id) for gen_id in ids)))


def first_poll_at_or_after(times: Sequence[float], moment: float) -> float | None:
    """The first poll time >= `moment` (the poll that saw the final status), if any."""
    ordered = sorted(times)
    index = bisect.bisect_left(ordered, moment)
    return ordered[index] if index < len(ordered) else None


def relay_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def machine_load() -> str:
    """The 1-minute load average against the core count: benchmarks share the machine."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def triple(values: Sequence[float], scale: float = 1000.0, digits: int = 0) -> str:
    """'p50 / p95 / p99' of `values` multiplied by `scale` (seconds -> ms by default)."""
    return " / ".join(
        f"{percentile(list(values), q) * scale:.{digits}f}" for q in (0.5, 0.95, 0.99)
    )


# --- the scenario ------------------------------------------------------------------------------


@dataclass
class _Planned:
    id: str
    create_at: float  # monotonic seconds
    lifetime_s: float


@dataclass
class _Outcome:
    final_at: dict[str, float]
    arrivals: list[list[Any]]
    poll_times: dict[str, list[float]]
    elapsed_s: float
    relay_cpu_s: float = 0.0


def run(results: Results, database: str, workdir: Path, quick: bool) -> None:
    rate_per_s = QUICK_RATE_PER_S if quick else FULL_RATE_PER_S
    duration_s = QUICK_DURATION_S if quick else FULL_DURATION_S
    workdir.mkdir(parents=True, exist_ok=True)
    url = new_database(database, workdir)
    try:
        api_key = create_key(url, "e2e")["api_key"]
        with cluster(workdir / f"e2e-{database}") as c:
            simulator = c.fake_upstream(SIMULATOR_KEY, seed=5)
            receiver = c.receiver()
            env = relay_env(
                url,
                simulator.url,
                SIMULATOR_KEY,
                RELAY_POLL_MIN_INTERVAL=str(POLL_MIN_S),
                RELAY_POLL_MAX_INTERVAL=str(POLL_MAX_S),
                RELAY_UPSTREAM_MAX_RPS="1000",
            )
            node = c.relay("relay", env).start()
            cpu_before_s = relay_cpu_s(node.pid)
            outcome = asyncio.run(
                _drive(simulator.url, node.url, receiver.url, api_key, rate_per_s, duration_s)
            )
            outcome.relay_cpu_s = relay_cpu_s(node.pid) - cpu_before_s
    finally:
        drop_database(url)
    _report(results, database, outcome, rate_per_s, duration_s)


async def _drive(
    simulator_url: str,
    relay_url: str,
    receiver_url: str,
    api_key: str,
    rate_per_s: float,
    duration_s: float,
) -> _Outcome:
    rng = random.Random(20)
    count = round(rate_per_s * duration_s)
    tag = f"{time.time_ns():x}"[-8:]
    started = time.monotonic()
    first_final = started + 1.0 + LIFETIME_S[1]
    plan = []
    for i in range(count):
        lifetime_s = rng.uniform(*LIFETIME_S)
        final_mono = first_final + i / rate_per_s
        plan.append(_Planned(f"gen_e2e_{tag}_{i}", final_mono - lifetime_s, lifetime_s))
    plan.sort(key=lambda p: p.create_at)

    final_at: dict[str, float] = {}
    subscribing: list[asyncio.Task[None]] = []
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=64, keepalive_timeout=1.0)  # under uvicorn's 5 s
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        next_index = 0
        while next_index < len(plan):
            await asyncio.sleep(max(0.0, plan[next_index].create_at - time.monotonic()))
            now = time.monotonic()
            due = []
            while next_index < len(plan) and plan[next_index].create_at <= now:
                due.append(plan[next_index])
                next_index += 1
            specs = [
                {
                    "id": p.id,
                    "family": "image",
                    "final_at_s": p.lifetime_s,
                    "final_status": "COMPLETED",
                }
                for p in due
            ]
            final_at.update(await create_generations(session, simulator_url, specs))
            for p in due:
                callback = f"{receiver_url}/e2e/{p.id}"
                coro = subscribe(session, relay_url, api_key, p.id, callback)
                subscribing.append(asyncio.create_task(coro))
        await asyncio.gather(*subscribing)
        # Every generation is final by the last one's final_at; allow two max poll gaps and
        # slack for a loaded machine before giving up on missing callbacks.
        last_final = max(final_at.values())
        deadline = time.monotonic() + max(0.0, last_final - time.time()) + 2 * POLL_MAX_S + 15
        arrivals = await wait_for_arrivals(session, receiver_url, count, deadline)
        poll_times = await fetch_poll_times(session, simulator_url, final_at)
    return _Outcome(final_at, arrivals, poll_times, time.monotonic() - started)


def _report(
    results: Results, database: str, outcome: _Outcome, rate_per_s: float, duration_s: float
) -> None:
    first_arrival: dict[str, float] = {}
    for _webhook_id, _sub_id, arrived_at, path in outcome.arrivals:
        gen_id = str(path).rsplit("/", 1)[-1]
        first_arrival[gen_id] = min(float(arrived_at), first_arrival.get(gen_id, float("inf")))
    end_to_end, detection, beyond = [], [], []
    for gen_id, final_at in outcome.final_at.items():
        arrived_at = first_arrival.get(gen_id)
        seen_at = first_poll_at_or_after(outcome.poll_times.get(gen_id, []), final_at)
        if arrived_at is None or seen_at is None:
            continue
        end_to_end.append(arrived_at - final_at)
        detection.append(seen_at - final_at)
        beyond.append(arrived_at - seen_at)
    total = len(outcome.final_at)
    polls = sum(len(t) for t in outcome.poll_times.values())
    setup = (
        f"{rate_per_s:g} finals/s for {duration_s:g} s, each created {LIFETIME_S[0]:g}-"
        f"{LIFETIME_S[1]:g} s before; RELAY_POLL_MIN_INTERVAL={POLL_MIN_S:g}, "
        f"MAX={POLL_MAX_S:g}, UPSTREAM_MAX_RPS=1000 (no throttling)"
    )
    results.add("e2e", database, "callbacks arrived", f"{len(first_arrival)}/{total}", setup)
    if not end_to_end:
        results.add("e2e", database, "end to end", "n/a", "no callback arrived")
        return
    results.add(
        "e2e",
        database,
        "final -> callback p50 / p95 / p99 ms",
        triple(end_to_end),
        "simulator final_at to the receiver's arrival time",
    )
    results.add(
        "e2e",
        database,
        "detection p50 / p95 / p99 ms",
        triple(detection),
        f"first poll after final_at (poll gaps {POLL_MIN_S:g}-{POLL_MAX_S:g} s)",
    )
    p99_beyond_ms = percentile(beyond, 0.99) * 1000
    verdict = "meets" if p99_beyond_ms <= TARGET_BEYOND_P99_MS else "misses"
    results.add(
        "e2e",
        database,
        "beyond detection p50 / p95 / p99 ms",
        triple(beyond),
        f"arrival - detecting poll; {verdict} the p99 <= {TARGET_BEYOND_P99_MS:g} ms target",
    )
    results.add(
        "e2e",
        database,
        "upstream polls per generation",
        f"{polls / total:.1f}",
        f"{polls} polls over {outcome.elapsed_s:.0f} s",
    )
    results.add(
        "e2e",
        database,
        "relay CPU during the run",
        f"{100 * outcome.relay_cpu_s / outcome.elapsed_s:.0f}%",
        f"of one core, over {outcome.elapsed_s:.0f} s; {machine_load()} at the end",
    )
