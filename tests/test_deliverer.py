"""Callback delivery end to end where the network matters: real relay, real simulator, real
receivers, both databases.

Signatures verified at a real receiver, redirects not followed, timeouts, a hanging receiver,
private addresses refused at delivery, SIGKILL with callbacks in flight; and the store's side
of host deferral. Scheduling decisions that need no socket (retry schedule, 410, Retry-After,
attempt numbering, redelivery, cancel) are in test_delivery_scheduling.py; the sender's own
HTTP behaviour in test_sender.py.

Every callback a test looks at is verified with the independent `standardwebhooks` package and
the key's secret. Receivers are uvicorn servers on loopback; the relay runs in-process (or, for
the crash test, as `relay serve` subprocesses killed with SIGKILL).
"""

from __future__ import annotations

import signal
import socket
import time
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from relay import store
from relay.app import create_app
from relay.database import Database
from relay.simulator import FakeUpstream, FinalStatus
from relay.store import seeding
from tests.delivery import (
    SCHEDULE_S,
    assert_callback,
    final_generation,
    get_attempts,
    pending_generation,
    running_relay,
    subscribe,
    verified,
    wait_status,
)
from tests.helpers import (
    UPSTREAM_KEY,
    Received,
    Receiver,
    fast_settings,
    log_tail,
    new_key,
    relay_process,
    serve_receiver,
    wait_for,
)

# --- Signatures, bodies, headers --------------------------------------------------------------


async def test_callbacks_are_signed_and_carry_the_final_body(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """Each final status sends a verifiable callback with upstream's body, field for field."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    statuses: tuple[FinalStatus, ...] = ("COMPLETED", "FAILED", "CANCELED")
    gens = {status: final_generation(sim, f"gen_{status.lower()}", status) for status in statuses}
    # Two failed attempts on the completed one, so retries are checked too.
    receiver.responses["/completed"] = [(500, {}, 0.0), (503, {}, 0.0), (200, {}, 0.0)]
    async with running_relay(fast_settings(db_url, upstream_url), key) as client:
        subs = {
            status: await subscribe(client, gen.id, f"{receiver.url}/{status.lower()}")
            for status, gen in gens.items()
        }
        for sub in subs.values():
            await wait_status(client, sub["id"], "delivered")
        attempts = await get_attempts(client, subs["COMPLETED"]["id"])

    for status, gen in gens.items():
        path = f"/{status.lower()}"
        callbacks = receiver.on(path)
        assert len(callbacks) == (3 if status == "COMPLETED" else 1)
        for number, callback in enumerate(callbacks, start=1):
            body = assert_callback(
                callback,
                key,
                sub_id=subs[status]["id"],
                event=f"generation.{status.lower()}",
                attempt=number,
                gen=gen,
            )
            assert body["status"] == status
            # A field the relay knows nothing about is passed through as upstream sent it.
            assert body["provider_meta"]["simulator"]
            # Byte for byte what the simulator answered.
            assert callback.body == gen.answer(2)[2]
        assert len({c.headers["webhook-id"] for c in callbacks}) == 1
    failed_body = orjson.loads(receiver.on("/failed")[0].body)
    assert failed_body["code"] and failed_body["message"]

    retried = receiver.on("/completed")
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["status_code"] for a in attempts] == [500, 503, 200]
    assert {a["webhook_id"] for a in attempts} == {retried[0].headers["webhook-id"]}


async def test_3xx_is_not_followed_and_retried_until_failed(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """A 302 is a failed attempt: the Location is never fetched, and it fails after the schedule."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_redirect")
    receiver.responses["/moved"] = [(302, {"location": f"{receiver.url}/target"}, 0.0)]
    async with running_relay(fast_settings(db_url, upstream_url), key) as client:
        sub = await subscribe(client, gen.id, f"{receiver.url}/moved")
        failed = await wait_status(client, sub["id"], "failed")
        attempts = await get_attempts(client, sub["id"])

    assert receiver.on("/target") == []
    assert len(receiver.on("/moved")) == 1 + len(SCHEDULE_S)
    assert [a["status_code"] for a in attempts] == [302] * (1 + len(SCHEDULE_S))
    assert failed["attempts"] == 1 + len(SCHEDULE_S)
    assert "302" in failed["last_error"]
    assert failed["delivered_at"] is None


async def test_timeout_is_retried(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """An answer slower than RELAY_DELIVERY_TIMEOUT is a failed attempt, retried."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_slow")
    receiver.responses["/slow"] = [(200, {}, 1.0), (200, {}, 0.0)]
    settings = fast_settings(db_url, upstream_url, delivery_timeout_s=0.5)
    async with running_relay(settings, key) as client:
        sub = await subscribe(client, gen.id, f"{receiver.url}/slow")
        done = await wait_status(client, sub["id"], "delivered")
        attempts = await get_attempts(client, sub["id"])

    assert len(receiver.on("/slow")) == 2
    first, second = attempts
    assert first["status_code"] is None
    assert "timed out" in first["error"]
    assert 400 <= first["duration_ms"] < 950, first  # cut off at 0.5 s, not the 1 s answer
    assert second["status_code"] == 200 and second["error"] is None
    assert done["attempts"] == 2


# --- Fairness between receivers ----------------------------------------------------------------


async def test_a_hanging_receiver_does_not_delay_a_healthy_one(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """Callbacks to a healthy host arrive promptly while another host hangs until the timeout;
    the hanging host gets no more than its per-host limit at once (4 here: 4 more wait here,
    the other 12 are deferred to the table)."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = pending_generation(sim, "gen_fair")
    count = 20
    receiver.responses["/hang"] = [(200, {}, 4.0)]  # past the 3 s timeout
    settings = fast_settings(db_url, upstream_url, delivery_timeout_s=3.0, delivery_per_host=4)
    with serve_receiver() as healthy:
        async with running_relay(settings, key) as client:
            for i in range(count):
                await subscribe(client, gen.id, f"{receiver.url}/hang?n={i}")
                await subscribe(client, gen.id, f"{healthy.url}/ok?n={i}")
            sim.finish(gen.id)
            final_at = time.time()
            await wait_for(lambda: len(healthy.on("/ok")) >= count, timeout_s=10)
            # Taken before the 3 s timeout frees the hanging host's first slots.
            await wait_for(lambda: len(receiver.on("/hang")) >= 4, timeout_s=2)
            hanging = list(receiver.on("/hang"))
            assert time.time() - final_at < 3.0, "too slow to see the per-host limit"

    arrivals = sorted(c.at for c in healthy.on("/ok"))
    spread_s = arrivals[-1] - final_at
    print(f"healthy receiver: all {count} callbacks {spread_s:.2f} s after the generation ended")
    # Well under the 3 s timeout that the hanging host holds its callbacks for.
    assert spread_s < 2.0, f"healthy callbacks took {spread_s:.2f} s"
    # The hang was real: the other host held callbacks in flight at the same time, as many
    # as its limit and no more.
    assert min(c.at for c in hanging) < arrivals[-1]
    assert len(hanging) == 4
    assert len({c.headers["relay-subscription-id"] for c in healthy.on("/ok")}) == count
    for callback in healthy.on("/ok"):
        verified(callback, key)


async def _final_deliveries(db: Database, urls: list[str], tag: str) -> list[int]:
    """One subscription per URL to its own generation, already final: one pending delivery
    each (queued at once, a late registration). Returns the delivery ids, in `urls` order."""
    key = await store.create_key(db, tag)
    await seeding.add_final_generations(db, {f"gen_{tag}_{i}": "{}" for i in range(len(urls))})
    key_hash = store.hash_api_key(key.api_key)
    await store.create_subscriptions(
        db,
        [store.CreateRequest(key_hash, f"gen_{tag}_{i}", url, None) for i, url in enumerate(urls)],
    )
    by_generation = await seeding.delivery_ids_by_generation(db)
    return [by_generation[f"gen_{tag}_{i}"] for i in range(len(urls))]


async def _lease(db: Database, delivery_id: int, owner: str, until_s: float) -> None:
    until = db.now() + timedelta(seconds=until_s)
    await seeding.schedule_delivery(db, delivery_id, until, lease_owner=owner)


async def test_releasing_waiting_deliveries_makes_them_due_for_anyone(db: Database) -> None:
    """On close, deliveries waiting for their host go back due now; a lease another node holds
    is not touched."""
    ids = await _final_deliveries(db, [f"https://93.184.216.34/{i}" for i in range(3)], "rel")
    mine = await store.claim_due_deliveries(db, "node-a", 2, lease_s=30)
    theirs = await store.claim_due_deliveries(db, "node-b", 5, lease_s=30)
    assert sorted([*(d.id for d in mine), *(d.id for d in theirs)]) == sorted(ids)

    await store.release_deliveries(db, "node-a", [d.id for d in [*mine, *theirs]])

    rows = await seeding.delivery_schedules(db)
    for delivery in mine:
        assert rows[delivery.id].lease_owner is None
    assert rows[theirs[0].id].lease_owner == "node-b"
    again = await store.claim_due_deliveries(db, "node-c", 5, lease_s=30)
    assert sorted(d.id for d in again) == sorted(d.id for d in mine)


async def test_a_saturated_host_has_its_due_backlog_deferred_with_the_surplus(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """defer_hosts gives back what this node claimed beyond the host's limit (even a delivery
    written without a host) and the host's other due, unleased deliveries, earliest first and
    at most HOST_DEFER_BATCH of them; other hosts, and leases held by anyone (even run out,
    their holder may still be sending), are not touched."""
    monkeypatch.setattr(store.deliveries, "HOST_DEFER_BATCH", 3)
    slow_urls = [f"https://93.184.216.34/{i}" for i in range(8)]
    other_urls = [f"https://93.184.216.35/{i}" for i in range(2)]
    ids = await _final_deliveries(db, slow_urls + other_urls, "dh")
    slow, other = ids[:8], ids[8:]
    now = db.now()
    await _lease(db, slow[0], "node-a", 30)  # node-a is sending it
    await _lease(db, slow[1], "node-a", 30)  # claimed by node-a beyond the limit
    await _lease(db, slow[2], "node-b", 30)  # node-b is sending it
    await _lease(db, slow[3], "node-a", -5)  # node-a's lease ran out; still sending
    await _lease(db, slow[4], "node-a", 30)  # claimed beyond the limit, written with no host
    await seeding.forget_delivery_host(db, slow[4])
    # slow[5:8] are due and unleased: three of them, and the batch is three.
    deferred = await store.defer_hosts(
        db, "node-a", {"93.184.216.34:443": store.HostDeferral([slow[1], slow[4]], 100.0)}
    )

    rows = await seeding.delivery_schedules(db)

    def due_in_s(delivery_id: int) -> float:
        due = rows[delivery_id].next_attempt_at
        assert due is not None
        return (due - now).total_seconds()

    assert deferred == 5
    for delivery_id in (slow[1], slow[4], *slow[5:8]):
        assert 95 < due_in_s(delivery_id) < 105, delivery_id
        assert rows[delivery_id].lease_owner is None
    assert rows[slow[0]].lease_owner == "node-a" and 25 < due_in_s(slow[0]) < 35
    assert rows[slow[2]].lease_owner == "node-b" and 25 < due_in_s(slow[2]) < 35
    assert rows[slow[3]].lease_owner == "node-a" and due_in_s(slow[3]) < 0
    assert {rows[i].host for i in slow[5:]} == {"93.184.216.34:443"}
    for delivery_id in other:
        assert due_in_s(delivery_id) < 5  # due since they were written
        assert rows[delivery_id].lease_owner is None

    # With a batch smaller than the backlog, the earliest due go first.
    await _lease(db, slow[5], "node-a", 30)
    ids_more = await _final_deliveries(db, [f"https://93.184.216.34/m{i}" for i in range(4)], "dm")
    for age_s, delivery_id in enumerate(ids_more, start=1):  # the last is the earliest
        await seeding.schedule_delivery(db, delivery_id, db.now() - timedelta(seconds=age_s))
    monkeypatch.setattr(store.deliveries, "HOST_DEFER_BATCH", 2)
    deferred = await store.defer_hosts(
        db, "node-a", {"93.184.216.34:443": store.HostDeferral([slow[5]], 100.0)}
    )
    rows = await seeding.delivery_schedules(db)
    assert deferred == 3
    pushed = [i for i in ids_more if due_in_s(i) > 50]  # the others are due already
    assert sorted(pushed) == sorted(ids_more[2:])


# --- Private addresses at delivery -------------------------------------------------------------

MAPPED_HOST = "callbacks.relay-test.example"


async def test_private_addresses_are_refused_at_delivery(
    db_url: str,
    fake_upstream: tuple[FakeUpstream, str],
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without private callbacks, a name resolving to 127.0.0.1, `localhost`, a literal
    127.0.0.1 and 127。0。0。1 (ideographic full stops) are refused at delivery: the receiver
    gets nothing."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_private")
    port = receiver.url.rsplit(":", 1)[1]
    real_getaddrinfo = socket.getaddrinfo

    def mapped_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == MAPPED_HOST:
            host = "127.0.0.1"
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", mapped_getaddrinfo)
    assert {info[4][0] for info in socket.getaddrinfo(MAPPED_HOST, 80)} == {"127.0.0.1"}
    urls = [
        f"http://{MAPPED_HOST}:{port}/mapped",
        f"http://localhost:{port}/localhost",
        f"http://127.0.0.1:{port}/literal",
        # Ideographic full stops: yarl (aiohttp's parser) reads this as 127.0.0.1.
        f"http://127\u30020\u30020\u30021:{port}/ideographic",
    ]
    # Subscriptions were accepted by a relay that allowed private callbacks; the worker
    # that delivers them does not.
    api_settings = fast_settings(db_url, upstream_url, allow_private_callbacks=True)
    worker_settings = fast_settings(db_url, upstream_url, allow_private_callbacks=False)
    async with running_relay(api_settings, key, role="api") as client:
        subs = [await subscribe(client, gen.id, url) for url in urls]
        # The worker runs on this test's event loop, whose resolver is the patched one.
        worker = create_app(worker_settings, role="worker")
        async with worker.router.lifespan_context(worker):
            failed = [await wait_status(client, sub["id"], "failed") for sub in subs]
        attempts = [await get_attempts(client, sub["id"]) for sub in subs]

    assert receiver.received == []
    for url, sub, sub_attempts in zip(urls, failed, attempts, strict=True):
        assert sub_attempts, url
        assert sub["attempts"] == len(sub_attempts)
        for attempt in sub_attempts:
            assert attempt["status_code"] is None, (url, attempt)
            assert "refused" in attempt["error"] and "blocked" in attempt["error"], (url, attempt)
        assert "blocked" in sub["last_error"]


# --- Crash: SIGKILL with callbacks in flight --------------------------------------------------


async def test_sigkill_with_callbacks_in_flight_loses_nothing(
    db_url: str,
    fake_upstream: tuple[FakeUpstream, str],
    receiver: Receiver,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Killing `relay serve` with callbacks in flight and starting it again delivers every
    subscription; a message sent twice carries the same webhook-id and body."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    env = {
        "RELAY_DATABASE_URL": db_url,
        "RELAY_UPSTREAM_URL": upstream_url,
        "RELAY_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "RELAY_ALLOW_PRIVATE_CALLBACKS": "true",
        "RELAY_LEASE": "2",
        "RELAY_DELIVERY_TIMEOUT": "5",
        "RELAY_POLL_MIN_INTERVAL": "0.1",
        "RELAY_POLL_MAX_INTERVAL": "0.3",
        "RELAY_DELIVERY_RETRY_SCHEDULE": "0.2,0.5,1,1,1",
    }
    delay_s = 1.0
    receiver.responses["/slow"] = [(200, {}, delay_s)]
    gens = [pending_generation(sim, f"gen_crash_{i}") for i in range(3)]
    log_path = tmp_path / "relay.log"
    auth = {"authorization": f"Bearer {key.api_key}"}
    async with relay_process(env, log_path) as (process, base_url):
        async with httpx.AsyncClient(base_url=base_url, headers=auth, timeout=10) as client:
            sub_ids = [
                (await subscribe(client, gen.id, f"{receiver.url}/slow?gen={gen.id}&n={n}"))["id"]
                for gen in gens
                for n in range(10)
            ]
        for gen in gens:
            sim.finish(gen.id)
        await wait_for(lambda: len(receiver.on("/slow")) >= 5, timeout_s=10, interval_s=0.01)
        process.send_signal(signal.SIGKILL)
        await process.wait()
        killed_at = time.time()
    # Requests the receiver was still holding when the relay died: never answered.
    in_flight = {
        c.headers["webhook-id"] for c in receiver.on("/slow") if killed_at - c.at < delay_s
    }
    assert in_flight, "the relay was killed with no callback in flight"

    async with (
        relay_process(env, log_path) as (_, base_url),
        httpx.AsyncClient(base_url=base_url, headers=auth, timeout=10) as client,
    ):

        async def all_delivered() -> bool:
            page = await client.get("/v1/subscriptions", params={"limit": 500})
            items: list[dict[str, Any]] = page.json()["items"]
            delivered = [item for item in items if item["status"] == "delivered"]
            return len(delivered) == len(sub_ids)

        try:
            await wait_for(all_delivered, timeout_s=30, interval_s=0.2)
        except TimeoutError:
            page = (await client.get("/v1/subscriptions", params={"limit": 500})).json()
            statuses = sorted(item["status"] for item in page["items"])
            raise AssertionError(f"not all delivered: {statuses}\n{log_tail(log_path)}") from None

    by_id: defaultdict[str, list[Received]] = defaultdict(list)
    for callback in receiver.on("/slow"):
        verified(callback, key)
        by_id[callback.headers["webhook-id"]].append(callback)
    assert {c[0].headers["relay-subscription-id"] for c in by_id.values()} == set(sub_ids)
    assert len(by_id) == len(sub_ids)  # one message per subscription, however often sent
    for copies in by_id.values():
        assert len({c.body for c in copies}) == 1
        assert len({c.headers["relay-subscription-id"] for c in copies}) == 1
    duplicates = sum(len(copies) - 1 for copies in by_id.values())
    assert all(len(by_id[webhook_id]) >= 2 for webhook_id in in_flight)
    with capsys.disabled():
        print(
            f"\n[sigkill {db_url.split('+')[0]}] {len(sub_ids)} subscriptions delivered; "
            f"{len(in_flight)} in flight at the kill; {duplicates} duplicate callbacks "
            "(same webhook-id, same body)"
        )
