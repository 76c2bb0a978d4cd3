"""Upstream cost: polls per generation and detection delay, relay's defaults against the naive loop.

A realistic mix (40% image 5-30 s, 30% speech 3-10 s, 30% video 60-300 s, each with a queue
phase before it runs) with every duration scaled by S (0.1; quick: 0.05), so video takes
6-30 s. Relay runs with its defaults scaled by the same S (RELAY_POLL_MIN_INTERVAL=2*S,
RELAY_POLL_MAX_INTERVAL=30*S, RELAY_UPSTREAM_TIMEOUT=20*S) and RELAY_UPSTREAM_MAX_RPS=1000 so
its rate cap never throttles. The naive baseline is what public client code does: one loop per
generation per app, poll, and if not final sleep 3 s (*S) and poll again, 20 s (*S) request
timeout, giving up after 15 min (*S); it runs here, in this process, one asyncio task per loop.

Every duration draw is used four times, on four disjoint generation ids created together in
the same simulator at the same moment: relay with 1 subscription, naive with 1 loop, relay with
3 subscriptions (3 callback URLs), naive with 3 independent loops. All four arms run at once,
so a noisy machine slows them alike. Draws start spread over a window, to keep the naive loops'
request rate moderate.

Measured per generation, from the simulator's per-id poll counters and times:

- polls per generation (every poll of that id);
- detection delay = first poll at or after the simulator's final_at, minus final_at: the same
  measure for both arms;
- what the application sees: for relay the callback's arrival at the receiver, for naive the
  moment its loop parsed the final status.

Delays are reported in unscaled seconds: the scheduling part (detection) is divided by S, the
fixed costs that do not shrink with S (request round trip, relay's recording and delivery) are
added unscaled, so "seen" = detection / S + (seen - detecting poll).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

from bench.common import Results, drop_database, new_database
from bench.e2e import (
    create_generations,
    fetch_poll_times,
    first_poll_at_or_after,
    machine_load,
    relay_env,
    subscribe,
    wait_for_arrivals,
)
from bench.harness import cluster, create_key
from bench.loadgen import percentile

# family, share of the mix, total duration range (s), queue duration range (s); unscaled.
MIX: tuple[tuple[str, float, tuple[float, float], tuple[float, float]], ...] = (
    ("image", 0.4, (5.0, 30.0), (0.0, 2.0)),
    ("speech", 0.3, (3.0, 10.0), (0.0, 1.0)),
    ("video", 0.3, (60.0, 300.0), (0.0, 10.0)),
)
OUTCOMES = (("COMPLETED", 0.93), ("FAILED", 0.05), ("CANCELED", 0.02))
FULL_SCALE, FULL_DRAWS, FULL_WINDOW_S = 0.1, 100, 60.0  # window in real (scaled) seconds
QUICK_SCALE, QUICK_DRAWS, QUICK_WINDOW_S = 0.05, 24, 10.0
NAIVE_INTERVAL_S, NAIVE_TIMEOUT_S, NAIVE_GIVE_UP_S = 3.0, 20.0, 900.0  # unscaled
RELAY_MIN_S, RELAY_MAX_S, RELAY_TIMEOUT_S = 2.0, 30.0, 20.0  # relay's defaults, unscaled
MANY = 3  # subscriptions (relay) or loops (naive) per generation in the coalescing arms
FINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELED"})
SIMULATOR_KEY = "sim-cost-key"
ARMS = ("relay1", "naive1", f"relay{MANY}", f"naive{MANY}")


@dataclass
class Draw:
    """One duration draw, shared by its four twins (ids `{prefix}_{arm}`)."""

    index: int
    family: str
    queue_s: float  # scaled
    run_s: float  # scaled
    final_status: str
    start_offset_s: float  # when the twins are created, from the run's start (real seconds)

    def gen_id(self, tag: str, arm: str) -> str:
        return f"gen_cost_{tag}_{self.index}_{arm}"


@dataclass
class Generation:
    """What one arm's generation did: filled in while the run goes."""

    draw: Draw
    arm: str
    final_at: float = 0.0  # unix s, from the simulator
    # (when the poll that saw the final status was sent, or None: take it from the
    # simulator's poll times; when the app saw it): one per naive loop or callback
    sightings: list[tuple[float | None, float]] = field(default_factory=list)
    poll_times: list[float] = field(default_factory=list)

    @property
    def subscribers(self) -> int:
        return MANY if self.arm.endswith(str(MANY)) else 1


def draw_mix(count: int, scale: float, window_s: float, seed: int = 4) -> list[Draw]:
    """`count` seeded draws from the mix, durations scaled, starts spread over `window_s`."""
    rng = random.Random(seed)
    families = [m[0] for m in MIX]
    weights = [m[1] for m in MIX]
    outcomes = [o[0] for o in OUTCOMES]
    outcome_weights = [o[1] for o in OUTCOMES]
    ranges = {m[0]: (m[2], m[3]) for m in MIX}
    draws = []
    for index in range(count):
        family = rng.choices(families, weights)[0]
        (total_lo, total_hi), (queue_lo, queue_hi) = ranges[family]
        total_s = rng.uniform(total_lo, total_hi)
        queue_s = rng.uniform(queue_lo, min(queue_hi, total_s / 2))
        draws.append(
            Draw(
                index=index,
                family=family,
                queue_s=queue_s * scale,
                run_s=(total_s - queue_s) * scale,
                final_status=rng.choices(outcomes, outcome_weights)[0],
                start_offset_s=index * window_s / count,
            )
        )
    return draws


async def naive_loop(
    session: aiohttp.ClientSession,
    poll_url: str,
    upstream_key: str,
    interval_s: float,
    timeout_s: float,
    give_up_s: float,
) -> tuple[float, float] | None:
    """Poll until a final status; returns (when that poll was sent, when its answer was
    parsed), unix s, or None on giving up."""
    headers = {"authorization": f"Bearer {upstream_key}", "accept": "application/json"}
    request_timeout = aiohttp.ClientTimeout(total=timeout_s)
    give_up_at = time.monotonic() + give_up_s
    while time.monotonic() < give_up_at:
        sent_at = time.time()
        try:
            async with session.get(poll_url, headers=headers, timeout=request_timeout) as response:
                raw = await response.read()
                if response.status == 200:
                    body = orjson.loads(raw)
                    if isinstance(body, dict) and str(body.get("status")).upper() in FINAL_STATUSES:
                        return sent_at, time.time()
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
            pass  # what client code does: try again on the next round
        await asyncio.sleep(interval_s)
    return None


def run(results: Results, database: str, workdir: Path, quick: bool) -> None:
    scale = QUICK_SCALE if quick else FULL_SCALE
    draws = draw_mix(
        QUICK_DRAWS if quick else FULL_DRAWS, scale, QUICK_WINDOW_S if quick else FULL_WINDOW_S
    )
    workdir.mkdir(parents=True, exist_ok=True)
    url = new_database(database, workdir)
    try:
        api_key = create_key(url, "cost")["api_key"]
        with cluster(workdir / f"cost-{database}") as c:
            simulator = c.fake_upstream(SIMULATOR_KEY, seed=4, time_scale=scale)
            receiver = c.receiver()
            env = relay_env(
                url,
                simulator.url,
                SIMULATOR_KEY,
                RELAY_POLL_MIN_INTERVAL=f"{RELAY_MIN_S * scale:g}",
                RELAY_POLL_MAX_INTERVAL=f"{RELAY_MAX_S * scale:g}",
                RELAY_UPSTREAM_TIMEOUT=f"{RELAY_TIMEOUT_S * scale:g}",
                RELAY_UPSTREAM_MAX_RPS="1000",
            )
            node = c.relay("relay", env).start()
            generations, missing = asyncio.run(
                _drive(simulator.url, node.url, receiver.url, api_key, draws, scale)
            )
    finally:
        drop_database(url)
    _report(results, database, generations, missing, scale)


async def _drive(
    simulator_url: str,
    relay_url: str,
    receiver_url: str,
    api_key: str,
    draws: Sequence[Draw],
    scale: float,
) -> tuple[list[Generation], dict[str, int]]:
    tag = f"{time.time_ns():x}"[-8:]
    by_id: dict[str, Generation] = {}
    naive_tasks: list[tuple[Generation, asyncio.Task[tuple[float, float] | None]]] = []
    setup_tasks: list[asyncio.Task[None]] = []
    control = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=30), connector=aiohttp.TCPConnector(limit=32)
    )
    # The naive apps' own client: no pool limit, as each app would have its own.
    naive = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    async with control, naive:

        async def start(draw: Draw) -> None:
            twins = [Generation(draw, arm) for arm in ARMS]
            specs = [
                {
                    "id": draw.gen_id(tag, g.arm),
                    "family": draw.family,
                    "queue_s": draw.queue_s,
                    "run_s": draw.run_s,
                    "final_status": draw.final_status,
                }
                for g in twins
            ]
            final_at = await create_generations(control, simulator_url, specs)
            subscriptions = []
            for g in twins:
                gen_id = draw.gen_id(tag, g.arm)
                g.final_at = final_at[gen_id]
                by_id[gen_id] = g
                for k in range(g.subscribers):
                    if g.arm.startswith("naive"):
                        loop = naive_loop(
                            naive,
                            f"{simulator_url}/v1/generation/{gen_id}",
                            SIMULATOR_KEY,
                            NAIVE_INTERVAL_S * scale,
                            NAIVE_TIMEOUT_S * scale,
                            NAIVE_GIVE_UP_S * scale,
                        )
                        naive_tasks.append((g, asyncio.create_task(loop)))
                    else:
                        callback = f"{receiver_url}/cost/{k}/{gen_id}"
                        subscriptions.append(
                            subscribe(control, relay_url, api_key, gen_id, callback)
                        )
            await asyncio.gather(*subscriptions)

        started = time.monotonic()
        for draw in draws:
            await asyncio.sleep(max(0.0, started + draw.start_offset_s - time.monotonic()))
            setup_tasks.append(asyncio.create_task(start(draw)))
        await asyncio.gather(*setup_tasks)

        # Everything is final by the last final_at; relay may need one more max gap to see it.
        last_final = max(g.final_at for g in by_id.values())
        wait_s = max(0.0, last_final - time.time()) + 2 * RELAY_MAX_S * scale + 20
        deadline = time.monotonic() + wait_s
        pending = [task for _g, task in naive_tasks]
        await asyncio.wait(pending, timeout=wait_s)
        for g, task in naive_tasks:
            sighting = task.result() if task.done() else None
            if sighting is not None:
                g.sightings.append(sighting)
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        expected = sum(g.subscribers for g in by_id.values() if g.arm.startswith("relay"))
        arrivals = await wait_for_arrivals(control, receiver_url, expected, deadline)
        for _webhook_id, _sub_id, arrived_at, path in arrivals:
            by_id[str(path).rsplit("/", 1)[-1]].sightings.append((None, float(arrived_at)))
        for gen_id, times in (await fetch_poll_times(control, simulator_url, by_id)).items():
            by_id[gen_id].poll_times = times
    missing: dict[str, int] = defaultdict(int)
    for g in by_id.values():
        missing[g.arm] += g.subscribers - len(g.sightings)
    return list(by_id.values()), dict(missing)


@dataclass
class _ArmFigures:
    polls: list[int] = field(default_factory=list)
    detection_s: list[float] = field(default_factory=list)  # unscaled
    seen_s: list[float] = field(default_factory=list)  # unscaled

    def add(self, g: Generation, scale: float) -> None:
        self.polls.append(len(g.poll_times))
        detected_at = first_poll_at_or_after(g.poll_times, g.final_at)
        if detected_at is not None:
            self.detection_s.append((detected_at - g.final_at) / scale)
        for sent_at, seen_at in g.sightings:
            # A naive loop knows its own detecting poll (with 3 loops the simulator's first
            # poll after final_at is only the quickest loop's); a request sent a moment before
            # final_at and answered after it detected with no delay.
            polled_at = detected_at if sent_at is None else max(sent_at, g.final_at)
            if polled_at is not None:
                self.seen_s.append((polled_at - g.final_at) / scale + (seen_at - polled_at))

    @property
    def mean_polls(self) -> float:
        return sum(self.polls) / len(self.polls) if self.polls else float("nan")


def _pair(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{percentile(values, 0.5):.1f} / {percentile(values, 0.95):.1f}"


def _report(
    results: Results,
    database: str,
    generations: list[Generation],
    missing: dict[str, int],
    scale: float,
) -> None:
    arms: dict[str, _ArmFigures] = defaultdict(_ArmFigures)
    families: dict[tuple[str, str], _ArmFigures] = defaultdict(_ArmFigures)
    for g in generations:
        arms[g.arm].add(g, scale)
        families[(g.draw.family, g.arm)].add(g, scale)
    draws = len({g.draw.index for g in generations})
    mix = ", ".join(f"{int(share * 100)}% {name}" for name, share, _t, _q in MIX)
    setup = (
        f"{draws} draws ({mix}) x 4 twin arms; time x{scale:g}; relay "
        f"RELAY_POLL_MIN_INTERVAL={RELAY_MIN_S * scale:g} MAX={RELAY_MAX_S * scale:g} "
        f"UPSTREAM_TIMEOUT={RELAY_TIMEOUT_S * scale:g} UPSTREAM_MAX_RPS=1000 (no throttling); "
        f"naive: poll, sleep {NAIVE_INTERVAL_S * scale:g} s, {NAIVE_TIMEOUT_S * scale:g} s timeout; "
        f"{machine_load()} at the end"
    )
    relay1, naive1 = arms["relay1"], arms["naive1"]
    relay_n, naive_n = arms[f"relay{MANY}"], arms[f"naive{MANY}"]
    results.add(
        "cost",
        database,
        "polls/generation relay / naive (1 sub)",
        f"{relay1.mean_polls:.1f} / {naive1.mean_polls:.1f}",
        setup,
    )
    results.add(
        "cost",
        database,
        "polls ratio relay / naive (1 sub)",
        f"{relay1.mean_polls / naive1.mean_polls:.2f}",
        "target < 1",
    )
    unscaled = f"unscaled s (scheduling / {scale:g}, request and delivery time as measured)"
    results.add(
        "cost",
        database,
        "detection p50 / p95 s, relay",
        _pair(relay1.detection_s),
        "first poll after final_at; " + unscaled,
    )
    results.add(
        "cost", database, "detection p50 / p95 s, naive", _pair(naive1.detection_s), unscaled
    )
    results.add(
        "cost",
        database,
        "app sees final p50 / p95 s, relay",
        _pair(relay1.seen_s),
        "callback arrival at the receiver; " + unscaled,
    )
    results.add(
        "cost",
        database,
        "app sees final p50 / p95 s, naive",
        _pair(naive1.seen_s),
        "the loop parsed the final status; " + unscaled,
    )
    for family, _share, _t, _q in MIX:
        r, n = families[(family, "relay1")], families[(family, "naive1")]
        results.add(
            "cost",
            database,
            f"{family}: polls/gen; detection p50/p95 s",
            f"{r.mean_polls:.1f} vs {n.mean_polls:.1f}",
            f"relay vs naive, {len(r.polls)} generations; detection relay "
            f"{_pair(r.detection_s)} vs naive {_pair(n.detection_s)}",
        )
    ratio = relay_n.mean_polls / naive_n.mean_polls
    verdict = "meets" if ratio <= 1 / MANY else "misses"
    results.add(
        "cost",
        database,
        f"polls/generation relay / naive ({MANY} subs)",
        f"{relay_n.mean_polls:.1f} / {naive_n.mean_polls:.1f}",
        f"relay: {MANY} subscriptions (3 callback URLs) per generation, one poll stream; "
        f"naive: {MANY} independent loops",
    )
    results.add(
        "cost",
        database,
        f"polls ratio relay / naive ({MANY} subs)",
        f"{ratio:.2f}",
        f"{verdict} the <= 1/{MANY} target; relay {MANY}-sub app sees final p50/p95 "
        f"{_pair(relay_n.seen_s)} s vs naive {_pair(naive_n.seen_s)} s",
    )
    lost = {arm: n for arm, n in missing.items() if n}
    if lost:
        results.add(
            "cost", database, "final results never seen", str(sum(lost.values())), f"by arm: {lost}"
        )
