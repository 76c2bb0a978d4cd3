"""The simulator's running list, GET /v1/generations/running, over real HTTP."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from relay.simulator import FakeUpstream
from tests.simulator_support import (
    create,
    set_faults,
    simulator_fixtures,
    stats,
)

RUNNING = "/v1/generations/running"


served, client = simulator_fixtures()


async def listed(client: httpx.AsyncClient, query: str = "") -> list[dict[str, object]]:
    answer = await client.get(RUNNING + query)
    assert answer.status_code == 200, answer.text
    items: list[dict[str, object]] = answer.json()
    return items


async def test_lists_queued_and_running_newest_first(client: httpx.AsyncClient) -> None:
    """Queued and running generations are listed newest first as {id, status, usage, input}."""
    queued = await create(client, family="video", queue_s=60, run_s=60)
    running = await create(client, family="image", queue_s=0, run_s=60, input={"prompt": "x"})
    await create(client, family="speech", final_at_s=0)
    items = await listed(client)
    assert [item["id"] for item in items] == [running["id"], queued["id"]]
    assert items[0] == {
        "id": running["id"],
        "status": "IN_PROGRESS",
        "usage": {"total": 0, "subscription": 0, "permanent": 0},
        "input": {"prompt": "x"},
    }
    assert items[1]["status"] == "IN_QUEUE"


async def test_a_generation_leaves_the_list_when_final(client: httpx.AsyncClient) -> None:
    """A generation is listed while it runs and gone once its final time has passed."""
    created = await create(client, family="image", queue_s=0, run_s=0.2)
    assert [item["id"] for item in await listed(client)] == [created["id"]]
    await asyncio.sleep(0.25)
    assert await listed(client) == []
    finished = await create(client, family="image", queue_s=0, run_s=60)
    await client.post(f"/_fake/generations/{finished['id']}/finish")
    assert await listed(client) == []


async def test_limit_cuts_the_newest(client: httpx.AsyncClient) -> None:
    """limit keeps only the newest N; the default is 50 and 100 is the most."""
    items = [{"family": "video", "queue_s": 60, "run_s": 60}] * 120
    answer = await client.post("/_fake/generations/bulk", json={"items": items})
    created = [item["id"] for item in answer.json()["items"]]
    assert [item["id"] for item in await listed(client, "?limit=3")] == created[::-1][:3]
    assert len(await listed(client)) == 50
    assert [item["id"] for item in await listed(client, "?limit=100")] == created[::-1][:100]


@pytest.mark.parametrize("query", ["?limit=0", "?limit=101", "?limit=ten", "?limit=-1", "?limit="])
async def test_a_bad_limit_is_400_in_the_upstream_shape(
    client: httpx.AsyncClient, query: str
) -> None:
    """A limit outside 1-100 (or not a number) is refused with INVALID_INPUT."""
    answer = await client.get(RUNNING + query)
    if query == "?limit=":
        assert answer.status_code == 200  # an empty value is the default
        return
    assert answer.status_code == 400
    assert set(answer.json()) == {"error", "code", "message"}
    assert answer.json()["code"] == "INVALID_INPUT"


async def test_other_workspace_and_hidden_generations_are_not_listed(
    client: httpx.AsyncClient,
) -> None:
    """Another workspace's generation is readable by id but never listed; nor is one in its
    not-found window until the window ends."""
    other = await create(client, family="video", queue_s=60, run_s=60, workspace="other")
    hidden = await create(client, family="video", queue_s=60, run_s=60, not_found_for_s=0.2)
    assert (await client.get(f"/v1/generation/{other['id']}")).status_code == 200
    assert await listed(client) == []
    await asyncio.sleep(0.25)
    assert [item["id"] for item in await listed(client)] == [hidden["id"]]
    bad = await client.post("/_fake/generations", json={"family": "image", "workspace": "mars"})
    assert bad.status_code == 400


async def test_bearer_is_checked(client: httpx.AsyncClient) -> None:
    """Without the key the list is 401, like a poll."""
    assert (await client.get(RUNNING, headers={"authorization": "Bearer no"})).status_code == 401


@pytest.mark.parametrize("status", [404, 405, 501])
async def test_the_switch_makes_the_endpoint_missing(
    client: httpx.AsyncClient, status: int
) -> None:
    """running_list_status answers 404, 405 or 501 as an upstream without the endpoint."""
    await create(client, family="video", queue_s=60, run_s=60)
    await set_faults(client, running_list_status=status)
    answer = await client.get(RUNNING)
    assert answer.status_code == status
    await set_faults(client, running_list_status=None)
    assert len(await listed(client)) == 1
    assert (await client.put("/_fake/faults", json={"running_list_status": 400})).status_code == 400


async def test_faults_apply_to_the_list(client: httpx.AsyncClient) -> None:
    """Latency, 5xx and 429 faults apply to list calls as to polls."""
    await set_faults(client, rate_limit_rate=1.0, retry_after_s=2)
    limited = await client.get(RUNNING)
    assert (limited.status_code, limited.headers["retry-after"]) == (429, "2")
    await set_faults(client, rate_limit_rate=0.0, error_rate=1.0)
    assert (await client.get(RUNNING)).status_code in (500, 502, 503)
    await set_faults(client, error_rate=0.0, latency_s=0.2)
    started = time.monotonic()
    await listed(client)
    assert time.monotonic() - started >= 0.2


async def test_list_calls_are_counted_apart_from_polls(client: httpx.AsyncClient) -> None:
    """list_total counts list calls; polls and per-id poll counts are untouched by them."""
    created = await create(client, family="video", queue_s=60, run_s=60)
    for _ in range(3):
        await listed(client)
    await client.get(f"/v1/generation/{created['id']}")
    totals = await stats(client)
    assert totals["list_total"] == 3
    assert totals["list_by_status_code"] == {"200": 3}
    assert totals["polls"] == 1
    assert totals["by_status_code"] == {"200": 1}
    polls = (await client.get(f"/_fake/generations/{created['id']}/polls")).json()
    assert polls["count"] == 1


def test_a_list_call_does_not_walk_every_generation_held() -> None:
    """A call looks at `limit` items plus the final ones it retires for good, never at every
    generation held (benchmarks hold 100,000)."""
    sim = FakeUpstream()
    final = {"family": "image", "final_at_s": 0.0}
    pending = {"family": "video", "queue_s": 60.0, "run_s": 60.0}
    sim.create_checked([final] * 30_000)
    running = {gen.id for gen in sim.create_checked([pending] * 5)}
    assert len(sim.running) == 30_005
    assert {gen.id for gen in sim.running.newest(100, time.monotonic())} == running
    assert len(sim.running) == 5  # the final ones were retired by that walk
    sim.create_checked([pending] * 30_000)
    started = time.perf_counter()
    for _ in range(100):
        assert len(sim.running.newest(100, time.monotonic())) == 100
    # 100 calls of 100 items take milliseconds; 100 walks of 30,000 would take seconds.
    assert time.perf_counter() - started < 0.5


async def test_list_calls_are_logged_with_their_time_and_concurrency(
    client: httpx.AsyncClient,
) -> None:
    """/_fake/lists gives every list call's time and the most answered at once."""
    await set_faults(client, latency_s=0.2)
    before = time.time()
    await asyncio.gather(*(client.get(RUNNING) for _ in range(3)))
    await set_faults(client, latency_s=0)
    lists = (await client.get("/_fake/lists")).json()
    assert lists["total"] == 3 and len(lists["times"]) == 3
    assert all(before <= t <= time.time() for t in lists["times"])
    assert lists["max_in_flight"] == 3
