"""Batch sweeps end to end over real HTTP: a relay on loopback reading the simulator's running
list, on SQLite and PostgreSQL; and three `relay serve` processes on one PostgreSQL database
sweeping one at a time.

The relay here polls by id slowly (RELAY_POLL_MIN_INTERVAL 2 s, MAX 10 s) and may sweep every
0.2 s, so what is detected within a second or so was detected by a sweep, and the simulator's
counters tell per-id polls from list calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay import migrate
from relay.app import create_app
from relay.simulator import FakeUpstream
from tests.helpers import (
    UPSTREAM_KEY,
    Receiver,
    drop_pg_database,
    fast_settings,
    free_port,
    new_key,
    pg_url_for_new_database,
    process,
    relay_process,
    serve_in_thread,
    serve_receiver,
    wait_for,
)

SWEEPING = {
    "poll_min_interval_s": 2.0,
    "poll_max_interval_s": 10.0,
    "sweep_min_interval_s": 0.2,
    "sweep": "auto",
}


@dataclass
class Setup:
    sim: FakeUpstream
    receiver: Receiver
    control: httpx.AsyncClient
    client: httpx.AsyncClient

    async def generations(self, count: int, **spec: Any) -> list[str]:
        ids = [f"gen_{uuid.uuid4().hex[:12]}" for _ in range(count)]
        items = [{"id": i, "family": "video", "queue_s": 0, "run_s": 3600, **spec} for i in ids]
        response = await self.control.post("/_fake/generations/bulk", json={"items": items})
        assert response.status_code == 201, response.text
        return ids

    async def subscribe_all(self, gen_ids: list[str]) -> dict[str, str]:
        """One subscription per generation; returns sub id by generation id."""
        subs = {}
        for gen_id in gen_ids:
            response = await self.client.post(
                "/v1/subscriptions",
                json={"generation_id": gen_id, "callback_url": f"{self.receiver.url}/{gen_id}"},
            )
            assert response.status_code == 201, response.text
            subs[gen_id] = response.json()["id"]
        return subs

    async def finish(self, gen_id: str) -> float:
        """Make it final now; returns when, by the simulator's clock (a sweep may see it
        before this call returns)."""
        response = await self.control.post(f"/_fake/generations/{gen_id}/finish")
        assert response.status_code == 200, response.text
        return float(response.json()["final_at"])

    def delivered(self, gen_id: str) -> bool:
        return bool(self.receiver.on(f"/{gen_id}"))

    def polls(self, gen_id: str) -> int:
        return self.sim.poll_count(gen_id)

    def lists(self) -> int:
        return self.sim.list_total


@contextlib.asynccontextmanager
async def sweeping_relay(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver, **changes: Any
) -> AsyncIterator[Setup]:
    sim, sim_url = fake_upstream
    settings = fast_settings(db_url, sim_url, **{**SWEEPING, **changes})
    key = await new_key(db_url)
    with serve_in_thread(create_app(settings)) as relay_url:
        async with (
            httpx.AsyncClient(base_url=sim_url, timeout=10) as control,
            httpx.AsyncClient(
                base_url=relay_url, headers={"authorization": f"Bearer {key.api_key}"}, timeout=10
            ) as client,
        ):
            yield Setup(sim, receiver, control, client)


async def test_a_complete_list_detects_finals_and_replaces_per_id_polls(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """With twenty running generations, sweeps list them every second (no per-id polls
    while listed), and one gone from a complete list is fetched at once and delivered."""
    async with sweeping_relay(db_url, fake_upstream, receiver) as s:
        gen_ids = await s.generations(20)
        await s.subscribe_all(gen_ids)
        await wait_for(lambda: s.lists() >= 3, timeout_s=10)
        before = {g: s.polls(g) for g in gen_ids}
        lists_before = s.lists()
        await asyncio.sleep(3.0)  # longer than the shortest per-id gap
        assert s.lists() >= lists_before + 2
        assert {g: s.polls(g) for g in gen_ids} == before  # listed: not polled by id

        finished = {g: await s.finish(g) for g in gen_ids[:3]}
        for gen_id, finished_at in finished.items():
            await wait_for(lambda g=gen_id: s.delivered(g), timeout_s=5)
            arrived = s.receiver.on(f"/{gen_id}")[0].at
            assert arrived - finished_at < 2.5  # a sweep, not the 2-10 s per-id schedule
            after = [t for t in s.sim.poll_times(gen_id) if t >= finished_at]
            assert len(after) == 1  # the one GET of the final body
        assert not any(s.delivered(g) for g in gen_ids[3:])


async def test_a_truncated_list_proves_only_presence(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """With more running than the list holds, absence proves nothing: a generation an earlier
    list showed is fetched once when it drops off (found final: delivered; found running,
    pushed off by newer ones: back to per-id polls, not fetched again on every sweep), and
    generations the list never shows keep their per-id polls."""
    async with sweeping_relay(db_url, fake_upstream, receiver) as s:
        oldest = await s.generations(5)  # the list is newest first: these fall off it
        newest = await s.generations(100)
        await s.subscribe_all(oldest + newest)
        await wait_for(lambda: s.lists() >= 3, timeout_s=15)

        ended = newest[-1]
        finished_at = await s.finish(ended)
        await wait_for(lambda: s.delivered(ended), timeout_s=5)
        assert s.receiver.on(f"/{ended}")[0].at - finished_at < 2.5
        assert len([t for t in s.sim.poll_times(ended) if t >= finished_at]) == 1

        # Ten newer generations push the oldest listed ones off the list.
        pushed = newest[:5]
        before = {g: s.polls(g) for g in pushed}
        await s.subscribe_all(await s.generations(10))
        lists_before = s.lists()
        await wait_for(lambda: all(s.polls(g) > before[g] for g in pushed), timeout_s=10)
        await wait_for(lambda: s.lists() >= lists_before + 6, timeout_s=10)
        assert all(s.polls(g) <= before[g] + 2 for g in pushed)  # not once per sweep
        assert not any(s.delivered(g) for g in pushed)
        assert all(s.polls(g) >= 2 for g in oldest)  # never listed: polled by id


async def test_a_list_that_showed_none_of_ours_is_looked_at_again(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """A list cut short by 100 newer generations nobody here watches shows none of ours: no
    sweep seems to pay. Relay looks again every RELAY_POLL_MAX_INTERVAL, and once those end,
    sweeps over ours resume at their cadence and detect their finals."""
    async with sweeping_relay(db_url, fake_upstream, receiver, poll_max_interval_s=3.0) as s:
        ours = await s.generations(12)
        late = (await s.generations(1))[0]
        others = await s.generations(100)  # newer: the list shows only these
        await s.subscribe_all(ours)
        await wait_for(lambda: s.lists() >= 2, timeout_s=10)  # a sweep, then a look
        # A look plans no sweep: a generation subscribed after it (once every node has read
        # the shared state, within a second) is polled at once, not left for a sweep that
        # may not come.
        await asyncio.sleep(1.5)
        await s.subscribe_all([late])
        await wait_for(lambda: s.polls(late) >= 1, timeout_s=1.0)
        for gen_id in others:
            await s.finish(gen_id)
        # A look comes within RELAY_POLL_MAX_INTERVAL (3 s) and finds ours; then sweeps
        # every 16/13 s (not every 3 s, as the looks alone would), and ours, listed, are not
        # polled by id.
        lists_before = s.lists()
        await wait_for(lambda: s.lists() >= lists_before + 2, timeout_s=10)
        polls_before = {g: s.polls(g) for g in ours}
        recovered_at = time.time()
        await asyncio.sleep(4.5)
        gaps = [b - a for a, b in itertools.pairwise(s.sim.list_times) if b >= recovered_at]
        assert len(gaps) >= 2 and max(gaps) < 2.0, gaps
        assert {g: s.polls(g) for g in ours} == polls_before

        finished_at = await s.finish(ours[0])
        await wait_for(lambda: s.delivered(ours[0]), timeout_s=5)
        assert s.receiver.on(f"/{ours[0]}")[0].at - finished_at < 2.5
        assert len([t for t in s.sim.poll_times(ours[0]) if t >= finished_at]) == 1


@pytest.mark.parametrize("status", [404, 405, 501])
async def test_an_upstream_without_the_list_turns_sweeps_off(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver, status: int
) -> None:
    """404, 405 or 501 from the running list: no more list calls, polling by id goes on."""
    async with sweeping_relay(db_url, fake_upstream, receiver, poll_max_interval_s=1.0) as s:
        await s.control.put("/_fake/faults", json={"running_list_status": status})
        gen_ids = await s.generations(10)
        await s.subscribe_all(gen_ids)
        await wait_for(lambda: s.lists() >= 1, timeout_s=10)
        await asyncio.sleep(2.0)
        assert s.lists() == 1
        await s.finish(gen_ids[0])
        await wait_for(lambda: s.delivered(gen_ids[0]), timeout_s=5)
        await s.control.put("/_fake/faults", json={"running_list_status": None})


async def test_another_workspaces_generation_is_not_fetched_on_every_sweep(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """A generation the relay can read by id but the list never shows is fetched once for
    its absence, then polled by id on its own schedule, and still delivered."""
    async with sweeping_relay(db_url, fake_upstream, receiver) as s:
        own = await s.generations(40)
        foreign = await s.generations(2, workspace="other")
        await s.subscribe_all(own + foreign)
        await wait_for(lambda: s.lists() >= 2, timeout_s=10)
        await asyncio.sleep(1.0)  # the first sweeps found them missing and fetched them
        lists_before = s.lists()
        polls_before = {g: s.polls(g) for g in foreign}
        await asyncio.sleep(6.0)
        sweeps = s.lists() - lists_before
        assert sweeps >= 6  # every 0.4 s: 40 generations covered
        for gen_id in foreign:
            # Per-id gaps of 2 s and more: three polls at most in 6 s, not one per sweep.
            assert s.polls(gen_id) - polls_before[gen_id] <= 3, s.sim.poll_times(gen_id)
        await s.finish(foreign[0])
        await wait_for(lambda: s.delivered(foreign[0]), timeout_s=20)


# --- three nodes, one PostgreSQL database ----------------------------------------------------


@pytest.fixture
def pg_url() -> Any:
    url = pg_url_for_new_database()
    try:
        migrate.upgrade(url)
        yield url
    finally:
        drop_pg_database(url)


@pytest.mark.postgres
@pytest.mark.timeout(300)
async def test_three_nodes_sweep_one_at_a_time_and_deliver_each_subscription_once(
    pg_url: str, tmp_path: Path
) -> None:
    """Three `relay serve` processes on one database: their list calls never overlap (each
    takes 0.25 s at the simulator), no more come than one per shortest sweep interval, and
    every subscription is delivered once."""
    min_interval_s = 0.3
    sim_port = free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    sim_args = [sys.executable, "-m", "relay.cli", "fake-upstream", "--port", str(sim_port)]
    sim_env = {"RELAY_FAKE_API_KEY": UPSTREAM_KEY, "RELAY_FAKE_SEED": "5"}
    key = await new_key(pg_url)
    env = {
        "RELAY_DATABASE_URL": pg_url,
        "RELAY_UPSTREAM_URL": sim_url,
        "RELAY_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "RELAY_ALLOW_PRIVATE_CALLBACKS": "true",
        "RELAY_POLL_MIN_INTERVAL": "2",
        "RELAY_POLL_MAX_INTERVAL": "10",
        "RELAY_SWEEP_MIN_INTERVAL": str(min_interval_s),
        "RELAY_UPSTREAM_MAX_RPS": "1000",
        "RELAY_LOG_LEVEL": "WARNING",
    }
    logs = tmp_path / "nodes.log"
    with serve_receiver() as receiver:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(
                process(sim_args, sim_env, tmp_path / "sim.log", f"{sim_url}/_fake/stats")
            )
            nodes = [await stack.enter_async_context(relay_process(env, logs)) for _ in range(3)]
            async with httpx.AsyncClient(timeout=10) as http:
                await http.put(f"{sim_url}/_fake/faults", json={"latency_s": 0.25})
                started = time.time()
                gen_ids = [f"gen_{uuid.uuid4().hex[:12]}" for _ in range(30)]
                items = [{"id": g, "family": "video", "run_s": 3600} for g in gen_ids]
                created = await http.post(
                    f"{sim_url}/_fake/generations/bulk", json={"items": items}
                )
                assert created.status_code == 201
                auth = {"authorization": f"Bearer {key.api_key}"}
                for index, gen_id in enumerate(gen_ids):
                    base_url = nodes[index % 3][1]
                    for k in (0, 1):
                        answer = await http.post(
                            f"{base_url}/v1/subscriptions",
                            headers=auth,
                            json={
                                "generation_id": gen_id,
                                "callback_url": f"{receiver.url}/{k}/{gen_id}",
                            },
                        )
                        assert answer.status_code == 201, answer.text
                await asyncio.sleep(4.0)
                for gen_id in gen_ids:
                    await http.post(f"{sim_url}/_fake/generations/{gen_id}/finish")

                await wait_for(lambda: len(receiver.received) >= 60, timeout_s=60)
                await asyncio.sleep(2.0)  # any duplicate would arrive meanwhile
                lists = (await http.get(f"{sim_url}/_fake/lists")).json()
                elapsed_s = time.time() - started
    by_subscription = Counter(r.headers["relay-subscription-id"] for r in receiver.received)
    assert len(by_subscription) == 60 and set(by_subscription.values()) == {1}
    assert lists["total"] >= 5
    assert lists["max_in_flight"] == 1
    assert lists["total"] <= elapsed_s / min_interval_s + 1
