"""Revoking a key stops its work, over real HTTP with a real receiver and the simulator, on
both databases: its subscriptions are canceled, nothing more is sent for them, and what only
it watched is no longer polled; other keys' work goes on."""

from __future__ import annotations

import asyncio

import httpx

from relay import store
from relay.simulator import FakeUpstream
from tests.apiclient import PUBLIC_HOOK
from tests.delivery import (
    final_generation,
    pending_generation,
    running_relay,
    subscribe,
    wait_status,
)
from tests.helpers import (
    Receiver,
    fast_settings,
    new_key,
    open_test_database,
    sync_count,
    wait_for,
)


async def test_revocation_cancels_subscriptions_stops_sends_and_polls(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """After `revoke_key`: A's active subscriptions are `canceled` with last_error "key
    revoked", its retrying callback gets no further attempt, the generation only A watched is
    no longer polled, and B's subscription to a shared generation is still delivered."""
    sim, upstream_url = fake_upstream
    a = await new_key(db_url, "a")
    b = await new_key(db_url, "b")
    only_a = pending_generation(sim, "gen_only_a")
    shared = pending_generation(sim, "gen_shared")
    failing = final_generation(sim, "gen_failing")
    receiver.responses["/a-fails"] = [(500, {}, 0.0)]
    settings = fast_settings(
        db_url, upstream_url, delivery_retry_schedule_s=(0.3,) * 50, poll_max_interval_s=0.2
    )
    async with (
        running_relay(settings, a) as client_a,
        running_relay(settings, b, role="api") as client_b,
    ):
        subs_a = [
            await subscribe(client_a, only_a.id, f"{receiver.url}/a"),
            await subscribe(client_a, shared.id, f"{receiver.url}/a"),
            await subscribe(client_a, failing.id, f"{receiver.url}/a-fails"),
        ]
        sub_b = await subscribe(client_b, shared.id, f"{receiver.url}/b")
        await wait_for(lambda: len(receiver.on("/a-fails")) >= 2, timeout_s=10)
        await wait_for(lambda: sim.poll_count(only_a.id) >= 2, timeout_s=10)

        db = open_test_database(db_url)
        try:
            revoked = await store.revoke_key(db, a.id)
            assert revoked is not None
            assert revoked.subscriptions_canceled == 3
            assert revoked.generations_stopped == 1
            # The API refuses A at once.
            assert (await client_a.get("/v1/subscriptions")).status_code == 401
            rows = [await store.get_subscription(db, a.id, s["id"]) for s in subs_a]
        finally:
            await db.dispose()
        for row in rows:
            assert row is not None
            assert row["status"] == "canceled"
            assert row["last_error"] == "key revoked"

        # Whatever was in flight has landed within a second; after that nothing more.
        await asyncio.sleep(1.0)
        sends_after = len(receiver.on("/a-fails"))
        polls_after = sim.poll_count(only_a.id)
        shared_polls = sim.poll_count(shared.id)
        await asyncio.sleep(1.5)
        assert len(receiver.on("/a-fails")) == sends_after
        assert sim.poll_count(only_a.id) == polls_after
        assert sim.poll_count(shared.id) > shared_polls  # B still watches it

        sim.finish(shared.id)
        await wait_for(lambda: receiver.on("/b"), timeout_s=10)
        assert receiver.on("/a") == []
        await wait_status(client_b, sub_b["id"], "delivered")


async def test_no_create_in_flight_slips_an_active_subscription_past_a_revocation(
    db_url: str,
) -> None:
    """Creates stream in over HTTP (eight at a time, each a new generation) while the key is
    revoked: every create answers 201 or 401, and once the revocation has returned and the
    creates in flight have answered, the key has no active subscription (on PostgreSQL a
    batch holds the key's lock shared from its key check to its commit, and a revocation
    takes it exclusively)."""
    key = await new_key(db_url, "racing")
    settings = fast_settings(db_url, allow_private_callbacks=False)
    statuses: list[int] = []
    revoked = asyncio.Event()

    async def creating(client: httpx.AsyncClient, worker: int) -> None:
        n = 0
        while not revoked.is_set():
            body = {"generation_id": f"gen_race_{worker}_{n}", "callback_url": PUBLIC_HOOK}
            statuses.append((await client.post("/v1/subscriptions", json=body)).status_code)
            n += 1

    async with running_relay(settings, key, role="api") as client:
        workers = [asyncio.create_task(creating(client, w)) for w in range(8)]
        await wait_for(lambda: len(statuses) >= 40, timeout_s=15)
        db = open_test_database(db_url)
        try:
            outcome = await store.revoke_key(db, key.id)
        finally:
            await db.dispose()
        assert outcome is not None and outcome.subscriptions_canceled >= 40
        await asyncio.sleep(0.3)  # creates sent after the revocation meet it
        revoked.set()
        await asyncio.wait_for(asyncio.gather(*workers), timeout=15)

    assert set(statuses) <= {201, 401}, sorted(set(statuses))
    active = (
        f"SELECT count(*) FROM subscriptions WHERE api_key_id = '{key.id}' AND status = 'active'"
    )
    assert await asyncio.to_thread(sync_count, db_url, active) == 0
