"""Callback delivery end to end: real relay, real simulator, real receivers, both databases.

Every callback a test looks at is verified with the independent `standardwebhooks` package and
the key's secret. Receivers are uvicorn servers on loopback; the relay runs in-process (or, for
the crash test, as `relay serve` subprocesses killed with SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import insert, select, update
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay import __version__, store
from relay.app import Role, create_app
from relay.config import Settings
from relay.database import Database
from relay.deliverer import EXCERPT_BYTES
from relay.fakeupstream import FakeUpstream, FinalStatus, Generation
from relay.models import deliveries, generations, subscriptions
from relay.store import NewKey
from tests.helpers import (
    UPSTREAM_KEY,
    Received,
    Receiver,
    fast_settings,
    log_tail,
    new_key,
    relay_process,
    serve_in_thread,
    wait_for,
)

SCHEDULE_S = (0.1, 0.2, 0.3)  # fast_settings' retry schedule: 4 attempts in all
NEVER_S = 3600.0  # a generation that stays IN_PROGRESS for the whole test

# --- Helpers ----------------------------------------------------------------------------------


@contextlib.contextmanager
def serve_receiver(bodies: dict[str, bytes] | None = None) -> Iterator[Receiver]:
    """A second receiver server (its own port), like conftest's, with per-path answer bodies."""
    state = Receiver()
    answer_bodies = bodies or {}

    async def hook(request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        state.received.append(Received(path, dict(request.headers), body, time.time()))
        script = state.responses.get(path)
        answer: tuple[int, dict[str, str], float] = (200, {}, 0.0)
        if script:
            answer = script.pop(0) if len(script) > 1 else script[0]
        status, headers, delay_s = answer
        if delay_s:
            await asyncio.sleep(delay_s)
        return Response(answer_bodies.get(path, b"ok"), status_code=status, headers=headers)

    app = Starlette(routes=[Route("/{path:path}", hook, methods=["POST"])])
    with serve_in_thread(app) as url:
        state.url = url
        yield state


@contextlib.asynccontextmanager
async def running_relay(
    settings: Settings, key: NewKey, role: Role = "all"
) -> AsyncIterator[httpx.AsyncClient]:
    """The relay app on a real socket; yields an API client authenticated with `key`."""
    app = create_app(settings, role=role)
    with serve_in_thread(app) as base:
        async with httpx.AsyncClient(
            base_url=base, headers={"authorization": f"Bearer {key.api_key}"}, timeout=10
        ) as client:
            yield client


async def subscribe(client: httpx.AsyncClient, generation_id: str, url: str) -> dict[str, Any]:
    response = await client.post(
        "/v1/subscriptions", json={"generation_id": generation_id, "callback_url": url}
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def get_sub(client: httpx.AsyncClient, sub_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/subscriptions/{sub_id}")
    assert response.status_code == 200, response.text
    sub: dict[str, Any] = response.json()
    return sub


async def get_attempts(client: httpx.AsyncClient, sub_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/subscriptions/{sub_id}/attempts")
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def wait_status(
    client: httpx.AsyncClient, sub_id: str, status: str, timeout_s: float = 10.0
) -> dict[str, Any]:
    """Wait until the subscription has `status` and its attempts are all recorded."""

    async def reached() -> dict[str, Any] | None:
        sub = await get_sub(client, sub_id)
        return sub if sub["status"] == status else None

    try:
        sub: dict[str, Any] = await wait_for(reached, timeout_s=timeout_s)
    except TimeoutError:
        last = await get_sub(client, sub_id)
        raise AssertionError(f"subscription never became {status}: {last}") from None
    return sub


def verified(callback: Received, key: NewKey) -> dict[str, Any]:
    """The callback's body after its signature checks out with the key's secret."""
    payload: dict[str, Any] = Webhook(key.signing_secret).verify(callback.body, callback.headers)
    return payload


def assert_callback(
    callback: Received,
    key: NewKey,
    *,
    sub_id: str,
    event: str,
    attempt: int,
    gen: Generation | None = None,
) -> dict[str, Any]:
    """Check one callback's signature and every header the contract names; return its body."""
    body = verified(callback, key)
    headers = callback.headers
    assert headers["content-type"] == "application/json"
    assert headers["relay-event"] == event
    assert headers["relay-subscription-id"] == sub_id
    assert headers["relay-attempt"] == str(attempt)
    assert headers["user-agent"] == f"relay/{__version__}"
    assert headers["webhook-signature"].startswith("v1,")
    # The timestamp is this attempt's: within a few seconds of when it arrived.
    assert abs(int(headers["webhook-timestamp"]) - callback.at) < 3
    if gen is not None:
        expected = gen.body(2)
        assert body == expected
        assert list(body) == list(expected)  # same fields, in upstream's order
    return body


def closed_port_url() -> str:
    """A loopback URL nobody listens on: connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def final_generation(
    sim: FakeUpstream, gen_id: str, status: FinalStatus = "COMPLETED"
) -> Generation:
    """A generation that is final 0.1 s from now."""
    return sim.add_generation("image", id=gen_id, queue_s=0.0, run_s=0.1, final_status=status)


def pending_generation(sim: FakeUpstream, gen_id: str) -> Generation:
    """A generation that stays IN_PROGRESS until the test finishes it."""
    return sim.add_generation("image", id=gen_id, queue_s=0.0, run_s=NEVER_S)


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


# --- One test per outcome class ----------------------------------------------------------------


async def test_2xx_delivers_with_one_attempt(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """A 2xx answer delivers the subscription after one attempt, with delivered_at set."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_ok")
    receiver.responses["/hook"] = [(204, {}, 0.0)]
    async with running_relay(fast_settings(db_url, upstream_url), key) as client:
        sub = await subscribe(client, gen.id, f"{receiver.url}/hook")
        done = await wait_status(client, sub["id"], "delivered")
        await asyncio.sleep(0.4)  # longer than any retry would wait
        attempts = await get_attempts(client, sub["id"])
        after = await get_sub(client, sub["id"])

    assert len(receiver.on("/hook")) == 1
    assert_callback(
        receiver.on("/hook")[0],
        key,
        sub_id=sub["id"],
        event="generation.completed",
        attempt=1,
        gen=gen,
    )
    assert done["delivered_at"] is not None
    assert done["attempts"] == 1 and done["last_error"] is None
    assert done["generation_status"] == "COMPLETED"
    assert after == done
    assert len(attempts) == 1
    (attempt,) = attempts
    assert attempt["attempt"] == 1
    assert attempt["status_code"] == 204
    assert attempt["error"] is None
    assert attempt["webhook_id"] == receiver.on("/hook")[0].headers["webhook-id"]
    assert isinstance(attempt["duration_ms"], int) and 0 <= attempt["duration_ms"] < 2000
    assert attempt["started_at"].endswith("Z")


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


async def test_410_fails_at_once(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """A 410 answer ends the subscription as failed after one attempt, with no retry."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_gone")
    receiver.responses["/gone"] = [(410, {}, 0.0)]
    async with running_relay(fast_settings(db_url, upstream_url), key) as client:
        sub = await subscribe(client, gen.id, f"{receiver.url}/gone")
        failed = await wait_status(client, sub["id"], "failed")
        await asyncio.sleep(0.6)  # longer than the whole retry schedule
        attempts = await get_attempts(client, sub["id"])

    assert len(receiver.on("/gone")) == 1
    assert failed["attempts"] == 1
    assert "410" in failed["last_error"]
    assert [a["status_code"] for a in attempts] == [410]


async def test_429_retry_after_is_honoured(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """A 429 with Retry-After: 1 delays the next attempt about 1 s, not the 0.1 s schedule."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_throttled")
    receiver.responses["/busy"] = [(429, {"retry-after": "1"}, 0.0), (200, {}, 0.0)]
    async with running_relay(fast_settings(db_url, upstream_url), key) as client:
        sub = await subscribe(client, gen.id, f"{receiver.url}/busy")
        await wait_status(client, sub["id"], "delivered")
        attempts = await get_attempts(client, sub["id"])

    first, second = receiver.on("/busy")
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
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """A 500 is retried on the schedule and the next 200 delivers it: two attempts, one id."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_flaky")
    receiver.responses["/flaky"] = [(500, {}, 0.0), (200, {}, 0.0)]
    async with running_relay(fast_settings(db_url, upstream_url), key) as client:
        sub = await subscribe(client, gen.id, f"{receiver.url}/flaky")
        done = await wait_status(client, sub["id"], "delivered")
        attempts = await get_attempts(client, sub["id"])

    callbacks = receiver.on("/flaky")
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
    db_url: str, fake_upstream: tuple[FakeUpstream, str]
) -> None:
    """A receiver answering NUL bytes cannot stop attempts being recorded (PostgreSQL text)."""
    answers = [500, 200]

    async def hook(request: Request) -> Response:
        await request.body()
        return Response(b"\x00bad\x00answer", status_code=answers.pop(0) if answers else 200)

    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_nul")
    app = Starlette(routes=[Route("/nul", hook, methods=["POST"])])
    with serve_in_thread(app) as nul_url:
        async with running_relay(fast_settings(db_url, upstream_url), key) as client:
            sub = await subscribe(client, gen.id, f"{nul_url}/nul")
            done = await wait_status(client, sub["id"], "delivered")
            attempts = await get_attempts(client, sub["id"])
    assert done["attempts"] == 2
    assert [a["status_code"] for a in attempts] == [500, 200]
    assert "\x00" not in (attempts[0]["response_excerpt"] or "")
    assert "bad" in (attempts[0]["response_excerpt"] or "")


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


async def test_refused_connection_is_retried_then_failed(
    db_url: str, fake_upstream: tuple[FakeUpstream, str]
) -> None:
    """A refused connection is retried on the schedule and fails when it is spent."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_refused")
    async with running_relay(fast_settings(db_url, upstream_url), key) as client:
        sub = await subscribe(client, gen.id, closed_port_url())
        failed = await wait_status(client, sub["id"], "failed")
        attempts = await get_attempts(client, sub["id"])

    assert len(attempts) == 1 + len(SCHEDULE_S)
    for attempt in attempts:
        assert attempt["status_code"] is None
        assert "connection failed" in attempt["error"], attempt
        assert attempt["response_excerpt"] is None
    assert failed["attempts"] == 1 + len(SCHEDULE_S)
    assert "connection failed" in failed["last_error"]


async def test_retry_exhaustion_fails_with_every_attempt_recorded(
    db_url: str, fake_upstream: tuple[FakeUpstream, str]
) -> None:
    """After 1 + len(schedule) failed attempts the subscription fails; each attempt is listed,
    oldest first, with a short excerpt even of a 1 MiB answer."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_exhausted")
    huge = b"x" * (1024 * 1024)
    with serve_receiver(bodies={"/down": huge}) as down:
        down.responses["/down"] = [(500, {}, 0.0)]
        async with running_relay(fast_settings(db_url, upstream_url), key) as client:
            sub = await subscribe(client, gen.id, f"{down.url}/down")
            failed = await wait_status(client, sub["id"], "failed")
            await asyncio.sleep(0.5)  # no attempt comes after the last one
            attempts = await get_attempts(client, sub["id"])
            after = await get_sub(client, sub["id"])

    callbacks = down.on("/down")
    assert len(callbacks) == 1 + len(SCHEDULE_S)
    for number, callback in enumerate(callbacks, start=1):
        assert_callback(
            callback, key, sub_id=sub["id"], event="generation.completed", attempt=number, gen=gen
        )
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
        excerpt = attempt["response_excerpt"]
        assert excerpt and set(excerpt) == {"x"}
        assert len(excerpt.encode()) <= EXCERPT_BYTES <= 4096


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
    now = db.now()
    async with db.transaction() as conn:
        await conn.execute(
            insert(generations),
            [
                {
                    "id": f"gen_{tag}_{i}",
                    "state": "final",
                    "status": "COMPLETED",
                    "result": "{}",
                    "first_subscribed_at": now,
                    "final_at": now,
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(len(urls))
            ],
        )
    key_hash = store.hash_api_key(key.api_key)
    await store.create_subscriptions(
        db,
        [store.CreateRequest(key_hash, f"gen_{tag}_{i}", url, None) for i, url in enumerate(urls)],
    )
    async with db.reader() as conn:
        by_generation = dict(
            (
                await conn.execute(
                    select(subscriptions.c.generation_id, deliveries.c.id).join(
                        deliveries, deliveries.c.subscription_id == subscriptions.c.id
                    )
                )
            ).all()
        )
    return [by_generation[f"gen_{tag}_{i}"] for i in range(len(urls))]


async def _delivery_rows(db: Database) -> dict[int, Any]:
    async with db.reader() as conn:
        return {
            row.id: row
            for row in await conn.execute(
                select(
                    deliveries.c.id,
                    deliveries.c.next_attempt_at,
                    deliveries.c.lease_owner,
                    deliveries.c.host,
                )
            )
        }


async def _lease(db: Database, delivery_id: int, owner: str, until_s: float) -> None:
    async with db.transaction() as conn:
        await conn.execute(
            update(deliveries)
            .where(deliveries.c.id == delivery_id)
            .values(lease_owner=owner, next_attempt_at=db.now() + timedelta(seconds=until_s))
        )


async def test_releasing_waiting_deliveries_makes_them_due_for_anyone(db: Database) -> None:
    """On close, deliveries waiting for their host go back due now; a lease another node holds
    is not touched."""
    ids = await _final_deliveries(db, [f"https://93.184.216.34/{i}" for i in range(3)], "rel")
    mine = await store.claim_due_deliveries(db, "node-a", 2, lease_s=30)
    theirs = await store.claim_due_deliveries(db, "node-b", 5, lease_s=30)
    assert sorted([*(d.id for d in mine), *(d.id for d in theirs)]) == sorted(ids)

    await store.release_deliveries(db, "node-a", [d.id for d in [*mine, *theirs]])

    rows = await _delivery_rows(db)
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
    monkeypatch.setattr(store, "HOST_DEFER_BATCH", 3)
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
    async with db.transaction() as conn:
        await conn.execute(update(deliveries).where(deliveries.c.id == slow[4]).values(host=None))
    # slow[5:8] are due and unleased: three of them, and the batch is three.
    deferred = await store.defer_hosts(
        db, "node-a", {"93.184.216.34:443": store.HostDeferral([slow[1], slow[4]], 100.0)}
    )

    rows = await _delivery_rows(db)

    def due_in_s(delivery_id: int) -> float:
        return float((rows[delivery_id].next_attempt_at - now).total_seconds())

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
    async with db.transaction() as conn:
        for age_s, delivery_id in enumerate(ids_more, start=1):  # the last is the earliest
            await conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery_id)
                .values(next_attempt_at=db.now() - timedelta(seconds=age_s))
            )
    monkeypatch.setattr(store, "HOST_DEFER_BATCH", 2)
    deferred = await store.defer_hosts(
        db, "node-a", {"93.184.216.34:443": store.HostDeferral([slow[5]], 100.0)}
    )
    rows = await _delivery_rows(db)
    assert deferred == 3
    pushed = [i for i in ids_more if rows[i].next_attempt_at > db.now() + timedelta(seconds=50)]
    assert sorted(pushed) == sorted(ids_more[2:])


# --- Private addresses at delivery -------------------------------------------------------------

MAPPED_HOST = "callbacks.relay-test.example"


async def test_private_addresses_are_refused_at_delivery(
    db_url: str,
    fake_upstream: tuple[FakeUpstream, str],
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without private callbacks, a name resolving to 127.0.0.1, `localhost` and a literal
    127.0.0.1 are refused at delivery: the receiver gets nothing."""
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


# --- Redelivery, expiry, cancel ----------------------------------------------------------------


async def test_redeliver_sends_the_same_message_again(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """Redeliver re-sends the stored body with the same webhook-id, a new timestamp and signature."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_again")
    async with running_relay(fast_settings(db_url, upstream_url), key) as client:
        sub = await subscribe(client, gen.id, f"{receiver.url}/hook")
        await wait_status(client, sub["id"], "delivered")
        first = receiver.on("/hook")[0]
        # Into the next second, so the new timestamp (and so the signature) must differ.
        await wait_for(lambda: time.time() >= int(first.headers["webhook-timestamp"]) + 1.05)
        answer = await client.post(f"/v1/subscriptions/{sub['id']}/redeliver")
        assert answer.status_code == 202, answer.text
        await wait_for(lambda: len(receiver.on("/hook")) >= 2, timeout_s=10)
        done = await wait_status(client, sub["id"], "delivered")
        attempts = await get_attempts(client, sub["id"])

    assert len(receiver.on("/hook")) == 2
    second = receiver.on("/hook")[1]
    assert_callback(first, key, sub_id=sub["id"], event="generation.completed", attempt=1, gen=gen)
    assert_callback(second, key, sub_id=sub["id"], event="generation.completed", attempt=2, gen=gen)
    assert second.body == first.body
    assert second.headers["webhook-id"] == first.headers["webhook-id"]
    assert int(second.headers["webhook-timestamp"]) > int(first.headers["webhook-timestamp"])
    assert second.headers["webhook-signature"] != first.headers["webhook-signature"]
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 200), (2, 200)]
    assert {a["webhook_id"] for a in attempts} == {first.headers["webhook-id"]}
    assert done["attempts"] == 2


async def test_expiry_notice_is_delivered(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """A generation not final within RELAY_GENERATION_TTL gets a signed generation.expired notice."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = pending_generation(sim, "gen_forever")
    settings = fast_settings(db_url, upstream_url, generation_ttl_s=0.3)
    async with running_relay(settings, key) as client:
        sub = await subscribe(client, gen.id, f"{receiver.url}/expired")
        expired = await wait_status(client, sub["id"], "expired")
        attempts = await get_attempts(client, sub["id"])

    (callback,) = receiver.on("/expired")
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
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """Canceling a subscription whose callback is retrying, or in flight, stops its attempts."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_cancel")
    receiver.responses["/retrying"] = [(500, {}, 0.0)]
    receiver.responses["/in-flight"] = [(500, {}, 1.0)]
    settings = fast_settings(db_url, upstream_url, delivery_retry_schedule_s=(1.0, 1.0, 1.0))
    async with running_relay(settings, key) as client:
        retrying = await subscribe(client, gen.id, f"{receiver.url}/retrying")
        in_flight = await subscribe(client, gen.id, f"{receiver.url}/in-flight")
        # Retrying: its first attempt is recorded and the next one is about 1 s away.
        await wait_for(lambda: get_attempts(client, retrying["id"]))
        # In flight: the receiver holds the request for 1 s.
        await wait_for(lambda: receiver.on("/in-flight"))
        for sub in (retrying, in_flight):
            answer = await client.delete(f"/v1/subscriptions/{sub['id']}")
            assert answer.status_code == 200, answer.text
            assert answer.json()["status"] == "canceled"
        await asyncio.sleep(2.0)  # past the next scheduled attempt (1 s +/- 20%)
        after = {sub["id"]: await get_sub(client, sub["id"]) for sub in (retrying, in_flight)}
        attempts = {
            sub["id"]: await get_attempts(client, sub["id"]) for sub in (retrying, in_flight)
        }

    assert len(receiver.on("/retrying")) == 1
    assert len(receiver.on("/in-flight")) == 1
    for sub_id, sub in after.items():
        assert sub["status"] == "canceled", sub
        assert len(attempts[sub_id]) == 1
        assert sub["delivered_at"] is None


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
