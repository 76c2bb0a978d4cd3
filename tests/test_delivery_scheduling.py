"""The deliverer's scheduling decisions, through the sender seam: a real relay (API, poller,
deliverer, both databases) and the real simulator, with a scripted sender in place of HTTP.

One test per outcome class (2xx, 410, 429 with Retry-After, 5xx then 2xx, no answer), retry
exhaustion and attempt numbering, redelivery, expiry notices, cancel, and host fairness. What
needs the network (signatures at a real receiver, redirects, timeouts, private addresses,
SIGKILL) is in test_deliverer.py; the sender's HTTP in test_sender.py. Every callback is still
verified with `standardwebhooks`, on the headers and body the sender was given.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import insert, update

from relay import store
from relay.database import Database
from relay.models import (
    CallbackEvent,
    DeliveryStatus,
    SubscriptionStatus,
    deliveries,
    subscriptions,
)
from relay.sender import EXCERPT_BYTES
from relay.simulator import FakeUpstream
from relay.store._sql import delivery_row
from tests.delivery import (
    SCHEDULE_S,
    assert_callback,
    final_generation,
    get_attempts,
    get_sub,
    pending_generation,
    running_relay,
    subscribe,
    wait_status,
)
from tests.helpers import fast_settings, new_key, open_test_database, wait_for
from tests.senders import HANG, Answer, ScriptedSender

RECEIVER = "https://receiver.test"  # never connected to: the scripted sender answers


@pytest.fixture
def sender() -> ScriptedSender:
    return ScriptedSender()


# --- One test per outcome class ----------------------------------------------------------------


async def test_2xx_delivers_with_one_attempt(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], sender: ScriptedSender
) -> None:
    """A 2xx answer delivers the subscription after one attempt, with delivered_at set."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_ok")
    sender.scripts["/hook"] = [Answer(204, excerpt=None)]
    async with running_relay(fast_settings(db_url, upstream_url), key, sender=sender) as client:
        sub = await subscribe(client, gen.id, f"{RECEIVER}/hook")
        done = await wait_status(client, sub["id"], "delivered")
        await asyncio.sleep(0.4)  # longer than any retry would wait
        attempts = await get_attempts(client, sub["id"])
        after = await get_sub(client, sub["id"])

    (callback,) = sender.on("/hook")
    assert_callback(
        callback, key, sub_id=sub["id"], event="generation.completed", attempt=1, gen=gen
    )
    assert done["delivered_at"] is not None
    assert done["attempts"] == 1 and done["last_error"] is None
    assert done["generation_status"] == "COMPLETED"
    assert after == done
    (attempt,) = attempts
    assert attempt["attempt"] == 1
    assert attempt["status_code"] == 204
    assert attempt["error"] is None
    assert attempt["webhook_id"] == callback.headers["webhook-id"]
    assert isinstance(attempt["duration_ms"], int) and 0 <= attempt["duration_ms"] < 2000
    assert attempt["started_at"].endswith("Z")
    # The attempt's timeout is RELAY_DELIVERY_TIMEOUT.
    assert sender.timeouts_s == [2.0]


async def test_410_fails_at_once(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], sender: ScriptedSender
) -> None:
    """A 410 answer ends the subscription as failed after one attempt, with no retry."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_gone")
    sender.scripts["/gone"] = [Answer(410)]
    async with running_relay(fast_settings(db_url, upstream_url), key, sender=sender) as client:
        sub = await subscribe(client, gen.id, f"{RECEIVER}/gone")
        failed = await wait_status(client, sub["id"], "failed")
        await asyncio.sleep(0.6)  # longer than the whole retry schedule
        attempts = await get_attempts(client, sub["id"])

    assert len(sender.on("/gone")) == 1
    assert failed["attempts"] == 1
    assert "410" in failed["last_error"]
    assert [a["status_code"] for a in attempts] == [410]


async def test_429_retry_after_is_honoured(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], sender: ScriptedSender
) -> None:
    """A 429 with Retry-After: 1 delays the next attempt about 1 s, not the 0.1 s schedule."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_throttled")
    sender.scripts["/busy"] = [Answer(429, retry_after="1"), Answer(200)]
    async with running_relay(fast_settings(db_url, upstream_url), key, sender=sender) as client:
        sub = await subscribe(client, gen.id, f"{RECEIVER}/busy")
        await wait_status(client, sub["id"], "delivered")
        attempts = await get_attempts(client, sub["id"])

    first, second = sender.on("/busy")
    gap_s = second.at - first.at
    assert 0.9 <= gap_s < 3.0, f"second attempt came {gap_s:.2f} s after the 429"
    assert [a["status_code"] for a in attempts] == [429, 200]
    # Each attempt is signed with its own timestamp; a second apart, they differ.
    assert int(second.headers["webhook-timestamp"]) > int(first.headers["webhook-timestamp"])
    assert first.headers["webhook-signature"] != second.headers["webhook-signature"]
    for number, callback in enumerate((first, second), start=1):
        assert_callback(
            callback, key, sub_id=sub["id"], event="generation.completed", attempt=number, gen=gen
        )


async def test_500_then_200_delivers_on_the_second_attempt(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], sender: ScriptedSender
) -> None:
    """A 500 is retried on the schedule and the next 200 delivers it: two attempts, one id."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_flaky")
    sender.scripts["/flaky"] = [Answer(500), Answer(200)]
    async with running_relay(fast_settings(db_url, upstream_url), key, sender=sender) as client:
        sub = await subscribe(client, gen.id, f"{RECEIVER}/flaky")
        done = await wait_status(client, sub["id"], "delivered")
        attempts = await get_attempts(client, sub["id"])

    callbacks = sender.on("/flaky")
    assert len(callbacks) == 2
    for number, callback in enumerate(callbacks, start=1):
        assert_callback(
            callback, key, sub_id=sub["id"], event="generation.completed", attempt=number, gen=gen
        )
    assert callbacks[0].headers["webhook-id"] == callbacks[1].headers["webhook-id"]
    # The schedule's first delay is 0.1 s with +/-20% jitter.
    assert 0.07 <= callbacks[1].at - callbacks[0].at < 1.5
    assert done["attempts"] == 2 and done["last_error"] is None
    assert done["delivered_at"] is not None
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 500), (2, 200)]
    assert attempts[0]["started_at"] <= attempts[1]["started_at"]


async def test_an_answer_with_nul_bytes_is_recorded_and_retried(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], sender: ScriptedSender
) -> None:
    """A receiver answering NUL bytes cannot stop attempts being recorded (PostgreSQL text)."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_nul")
    sender.scripts["/nul"] = [Answer(500, excerpt="\x00bad\x00answer"), Answer(200)]
    async with running_relay(fast_settings(db_url, upstream_url), key, sender=sender) as client:
        sub = await subscribe(client, gen.id, f"{RECEIVER}/nul")
        done = await wait_status(client, sub["id"], "delivered")
        attempts = await get_attempts(client, sub["id"])
    assert done["attempts"] == 2 and done["status"] == "delivered"
    assert [a["status_code"] for a in attempts] == [500, 200]
    assert "\x00" not in (attempts[0]["response_excerpt"] or "")
    assert "bad" in (attempts[0]["response_excerpt"] or "")


async def test_no_answer_is_retried_then_failed(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], sender: ScriptedSender
) -> None:
    """An attempt with no answer (here a refused connection) is retried on the schedule and
    fails when it is spent, its error recorded on every attempt."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_refused")
    refused = "connection failed: [Errno 111] Connect call failed"
    sender.scripts["/refused"] = [Answer(None, error=refused, excerpt=None)]
    async with running_relay(fast_settings(db_url, upstream_url), key, sender=sender) as client:
        sub = await subscribe(client, gen.id, f"{RECEIVER}/refused")
        failed = await wait_status(client, sub["id"], "failed")
        attempts = await get_attempts(client, sub["id"])

    assert len(sender.on("/refused")) == len(attempts) == 1 + len(SCHEDULE_S)
    for attempt in attempts:
        assert attempt["status_code"] is None
        assert attempt["error"] == refused, attempt
        assert attempt["response_excerpt"] is None
    assert failed["attempts"] == 1 + len(SCHEDULE_S)
    assert "connection failed" in failed["last_error"]


async def test_retry_exhaustion_fails_with_every_attempt_recorded(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], sender: ScriptedSender
) -> None:
    """After 1 + len(schedule) failed attempts the subscription fails; each attempt is listed,
    oldest first, numbered, with the answer's excerpt."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_exhausted")
    sender.scripts["/down"] = [Answer(500, excerpt="x" * EXCERPT_BYTES)]
    async with running_relay(fast_settings(db_url, upstream_url), key, sender=sender) as client:
        sub = await subscribe(client, gen.id, f"{RECEIVER}/down")
        failed = await wait_status(client, sub["id"], "failed")
        await asyncio.sleep(0.5)  # no attempt comes after the last one
        attempts = await get_attempts(client, sub["id"])
        after = await get_sub(client, sub["id"])

    callbacks = sender.on("/down")
    assert len(callbacks) == 1 + len(SCHEDULE_S)
    for number, callback in enumerate(callbacks, start=1):
        assert_callback(
            callback, key, sub_id=sub["id"], event="generation.completed", attempt=number, gen=gen
        )
    # Retries wait the schedule's delays (+/-20% jitter), not a moment more than needed.
    gaps_s = [b.at - a.at for a, b in itertools.pairwise(callbacks)]
    for gap_s, delay_s in zip(gaps_s, SCHEDULE_S, strict=True):
        assert 0.75 * delay_s <= gap_s < delay_s + 1.0, gaps_s
    assert failed["attempts"] == 1 + len(SCHEDULE_S) == after["attempts"]
    assert failed["last_error"] and "500" in failed["last_error"]
    assert failed["delivered_at"] is None
    assert [a["attempt"] for a in attempts] == [1, 2, 3, 4]
    assert [a["started_at"] for a in attempts] == sorted(a["started_at"] for a in attempts)
    assert {a["webhook_id"] for a in attempts} == {callbacks[0].headers["webhook-id"]}
    for attempt in attempts:
        assert attempt["status_code"] == 500
        assert attempt["error"] is None
        assert isinstance(attempt["duration_ms"], int) and attempt["duration_ms"] >= 0
        assert attempt["response_excerpt"] == "x" * EXCERPT_BYTES


# --- Fairness between receivers ----------------------------------------------------------------


async def test_a_stuck_host_holds_only_its_slots_while_others_are_delivered(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], sender: ScriptedSender
) -> None:
    """A host that never answers has exactly RELAY_DELIVERY_PER_HOST callbacks in flight, the
    rest waiting or given back, while every callback to a healthy host is delivered at once."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = pending_generation(sim, "gen_fair")
    count, per_host = 12, 3
    sender.scripts["/hang"] = [HANG]
    settings = fast_settings(
        db_url, upstream_url, delivery_timeout_s=3.0, delivery_per_host=per_host
    )
    async with running_relay(settings, key, sender=sender) as client:
        healthy = [
            await subscribe(client, gen.id, f"https://healthy.test/ok?n={i}") for i in range(count)
        ]
        for i in range(count):
            await subscribe(client, gen.id, f"https://stuck.test/hang?n={i}")
        sim.finish(gen.id)
        final_at = time.time()
        for sub in healthy:
            await wait_status(client, sub["id"], "delivered", timeout_s=2.5)
        delivered_s = time.time() - final_at
        assert delivered_s < 2.5, "too slow to see the host stuck before its timeout"
        stuck_posts = len(sender.on("/hang"))

    assert stuck_posts == per_host
    assert sender.peak_in_flight["stuck.test:443"] == per_host
    assert len(sender.on("/ok")) == count
    assert delivered_s < 2.0, f"healthy callbacks took {delivered_s:.2f} s"


# --- Redelivery, expiry, cancel ----------------------------------------------------------------


async def test_redeliver_sends_the_same_message_again(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], sender: ScriptedSender
) -> None:
    """Redeliver re-sends the stored body with the same webhook-id, a new timestamp and signature."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_again")
    async with running_relay(fast_settings(db_url, upstream_url), key, sender=sender) as client:
        sub = await subscribe(client, gen.id, f"{RECEIVER}/hook")
        await wait_status(client, sub["id"], "delivered")
        first = sender.on("/hook")[0]
        # Into the next second, so the new timestamp (and so the signature) must differ.
        await wait_for(lambda: time.time() >= int(first.headers["webhook-timestamp"]) + 1.05)
        answer = await client.post(f"/v1/subscriptions/{sub['id']}/redeliver")
        assert answer.status_code == 202, answer.text

        async def second_attempt_recorded() -> dict[str, Any] | None:
            # Active while redelivered, delivered again once its attempt is recorded.
            now = await get_sub(client, sub["id"])
            return now if now["attempts"] == 2 else None

        done = await wait_for(second_attempt_recorded, timeout_s=10)
        attempts = await get_attempts(client, sub["id"])

    assert len(sender.on("/hook")) == 2
    second = sender.on("/hook")[1]
    assert_callback(first, key, sub_id=sub["id"], event="generation.completed", attempt=1, gen=gen)
    assert_callback(second, key, sub_id=sub["id"], event="generation.completed", attempt=2, gen=gen)
    assert second.body == first.body
    assert second.headers["webhook-id"] == first.headers["webhook-id"]
    assert int(second.headers["webhook-timestamp"]) > int(first.headers["webhook-timestamp"])
    assert second.headers["webhook-signature"] != first.headers["webhook-signature"]
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 200), (2, 200)]
    assert {a["webhook_id"] for a in attempts} == {first.headers["webhook-id"]}
    assert done["attempts"] == 2 and done["status"] == "delivered"


async def test_redeliver_past_retention_is_never_pruned_before_it_is_sent(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], sender: ScriptedSender
) -> None:
    """Redeliver of a subscription delivered longer than RELAY_RETENTION ago makes it active
    with a fresh updated_at; pruning then keeps it and its pending delivery, which is sent."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_old")
    settings = fast_settings(db_url, upstream_url, retention_s=0.5)
    async with running_relay(settings, key, sender=sender) as client:
        sub = await subscribe(client, gen.id, f"{RECEIVER}/old")
        delivered = await wait_status(client, sub["id"], "delivered")
    await asyncio.sleep(0.7)  # now past retention
    # An API-only relay: the redelivery stays pending while pruning runs.
    async with running_relay(settings, key, role="api") as client:
        answer = await client.post(f"/v1/subscriptions/{sub['id']}/redeliver")
        assert answer.status_code == 202, answer.text
        assert answer.json()["status"] == "active"
        assert answer.json()["updated_at"] >= delivered["updated_at"]
        db = open_test_database(db_url)
        try:
            await store.prune(db, settings.retention_s)
        finally:
            await db.dispose()
        kept = await get_sub(client, sub["id"])
        assert kept["status"] == "active"
    async with running_relay(settings, key, sender=sender) as client:
        again = await wait_status(client, sub["id"], "delivered")
    assert len(sender.on("/old")) == 2
    assert again["attempts"] == 2


async def test_pruning_keeps_a_finished_subscription_with_a_pending_delivery(db: Database) -> None:
    """A subscription past retention that still has a pending delivery is not pruned; once
    the delivery is over it is."""
    key = await store.create_key(db, "prune")
    outcome = await store.create_subscriptions(
        db, [store.CreateRequest(store.hash_api_key(key.api_key), "gen_p", "http://x.test/", None)]
    )
    sub = outcome.results[0].subscription
    assert sub is not None
    old = db.now() - timedelta(seconds=3600)
    async with db.transaction() as conn:
        await conn.execute(
            update(subscriptions)
            .where(subscriptions.c.id == sub["id"])
            .values(status=SubscriptionStatus.DELIVERED, updated_at=old)
        )
        await conn.execute(
            insert(deliveries).values(
                **delivery_row(sub["id"], "http://x.test/", CallbackEvent.COMPLETED, "{}", old)
            )
        )
    assert await store.prune(db, 60) == 0
    async with db.transaction() as conn:
        await conn.execute(update(deliveries).values(status=DeliveryStatus.DELIVERED))
    assert await store.prune(db, 60) == 1


async def test_expiry_notice_is_delivered(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], sender: ScriptedSender
) -> None:
    """A generation not final within RELAY_GENERATION_TTL gets a signed generation.expired notice."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = pending_generation(sim, "gen_forever")
    settings = fast_settings(db_url, upstream_url, generation_ttl_s=0.3)
    async with running_relay(settings, key, sender=sender) as client:
        sub = await subscribe(client, gen.id, f"{RECEIVER}/expired")
        expired = await wait_status(client, sub["id"], "expired")
        attempts = await get_attempts(client, sub["id"])

    (callback,) = sender.on("/expired")
    body = assert_callback(callback, key, sub_id=sub["id"], event="generation.expired", attempt=1)
    assert list(body) == ["id", "status", "input", "data", "usage", "code", "message"]
    assert body["id"] == gen.id
    assert body["status"] == "FAILED"
    assert body["input"] is None and body["data"] is None and body["usage"] is None
    assert body["code"] == "RELAY_EXPIRED"
    assert isinstance(body["message"], str) and body["message"]
    assert expired["attempts"] == 1
    assert [a["status_code"] for a in attempts] == [200]


async def test_cancel_stops_further_attempts(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], sender: ScriptedSender
) -> None:
    """Canceling a subscription whose callback is retrying, or in flight, stops its attempts."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_cancel")
    sender.scripts["/retrying"] = [Answer(500)]
    sender.scripts["/in-flight"] = [Answer(500, delay_s=1.0)]
    settings = fast_settings(db_url, upstream_url, delivery_retry_schedule_s=(1.0, 1.0, 1.0))
    async with running_relay(settings, key, sender=sender) as client:
        retrying = await subscribe(client, gen.id, f"{RECEIVER}/retrying")
        in_flight = await subscribe(client, gen.id, f"{RECEIVER}/in-flight")
        # Retrying: its first attempt is recorded and the next one is about 1 s away.
        await wait_for(lambda: get_attempts(client, retrying["id"]))
        # In flight: the receiver holds the request for 1 s.
        await wait_for(lambda: sender.on("/in-flight"))
        for sub in (retrying, in_flight):
            answer = await client.delete(f"/v1/subscriptions/{sub['id']}")
            assert answer.status_code == 200, answer.text
            assert answer.json()["status"] == "canceled"
        await asyncio.sleep(2.0)  # past the next scheduled attempt (1 s +/- 20%)
        after = {sub["id"]: await get_sub(client, sub["id"]) for sub in (retrying, in_flight)}
        attempts = {
            sub["id"]: await get_attempts(client, sub["id"]) for sub in (retrying, in_flight)
        }

    assert len(sender.on("/retrying")) == 1
    assert len(sender.on("/in-flight")) == 1
    for sub_id, sub in after.items():
        assert sub["status"] == "canceled", sub
        assert len(attempts[sub_id]) == 1
        assert sub["delivered_at"] is None
    assert sender.closed  # the relay closes the sender it was given when it stops
