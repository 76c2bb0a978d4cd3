"""Idempotency-Key on creates through the relay, over real HTTP against the simulator, on
SQLite and PostgreSQL: retries get the first answer without a second create, duplicates wait,
mismatches are refused, and a key whose holder died is never used to create again.

The simulator counts every create it gets (`/_fake/creates`): that count is the test of
"no second create", the thing that protects users' credits.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import orjson
import pytest
from sqlalchemy import update

from relay import idempotency, store
from relay.database import Database
from relay.models import idempotency_keys
from relay.simulator import FakeUpstream
from tests.apiclient import OTHER_PUBLIC_HOOK, PUBLIC_HOOK, expect_error
from tests.helpers import new_key
from tests.proxy_support import MODEL_PATH, Rig, proxy_fixtures, rig

upstream, proxy = proxy_fixtures()


def keyed(idempotency_key: str, **more: str) -> dict[str, str | bytes]:
    return {"idempotency-key": idempotency_key, **more}


async def created_ids(proxy: Rig) -> list[str | None]:
    return [c["id"] for c in await proxy.upstream_creates()]


async def test_a_retry_gets_the_first_answer_without_a_second_create(proxy: Rig) -> None:
    """Status, body, content type and Relay-Subscription-Id come back again, marked
    Idempotent-Replayed; the upstream saw one create and there is one subscription."""
    first = await proxy.create(headers=keyed("k-retry"))
    assert first.status_code == 200, first.text
    assert "idempotent-replayed" not in first.headers
    for _ in range(2):
        again = await proxy.create(headers=keyed("k-retry"))
        assert again.status_code == 200, again.text
        assert again.content == first.content
        assert again.headers["content-type"] == first.headers["content-type"]
        assert again.headers["relay-subscription-id"] == first.headers["relay-subscription-id"]
        assert again.headers["idempotent-replayed"] == "true"
    assert await created_ids(proxy) == [first.json()["id"]]
    assert len(await proxy.subscriptions()) == 1


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"body": {"prompt": "a dog"}}, "body"),
        ({"path": "/v1/generation/flux/schnell"}, "method and path"),
        ({"callback_url": OTHER_PUBLIC_HOOK}, "Relay-Callback-Url or Relay-Metadata"),
        ({"headers": keyed("k-mismatch", **{"relay-metadata": '{"a": 1}'})}, "Relay-Metadata"),
    ],
)
async def test_the_same_key_for_another_request_is_422(
    proxy: Rig, change: dict[str, object], what: str
) -> None:
    """Another body, path, callback URL or metadata under a used key is 422
    idempotency_mismatch naming what differs; nothing more is created."""
    first = await proxy.create(headers=keyed("k-mismatch"))
    assert first.status_code == 200, first.text
    arguments: dict[str, object] = {"headers": keyed("k-mismatch"), **change}
    answer = await proxy.create(**arguments)  # type: ignore[arg-type]
    error = expect_error(answer, 422, "idempotency_mismatch")
    assert what in error.error.message
    assert len(await created_ids(proxy)) == 1


async def test_keys_are_per_client_key(proxy: Rig) -> None:
    """Two client keys using the same Idempotency-Key create twice: a key is theirs alone."""
    other = (await new_key(proxy.db_url, "other")).api_key
    first = await proxy.create(headers=keyed("shared-name"))
    second = await proxy.create(headers=keyed("shared-name"), key=other)
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.json()["id"] != second.json()["id"]
    assert "idempotent-replayed" not in second.headers
    assert len(await created_ids(proxy)) == 2


async def test_100_concurrent_requests_with_one_key_create_once(proxy: Rig) -> None:
    """100 requests at once with one key: exactly one upstream create, and every request
    gets its answer and subscription (99 of them marked as replays)."""
    await proxy.faults(create_latency_s=0.3)
    answers = await asyncio.gather(*(proxy.create(headers=keyed("k-100")) for _ in range(100)))
    assert {a.status_code for a in answers} == {200}, {a.text for a in answers}
    assert len({a.content for a in answers}) == 1
    assert len({a.headers["relay-subscription-id"] for a in answers}) == 1
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 99
    assert len(await created_ids(proxy)) == 1
    assert len(await proxy.subscriptions()) == 1


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_concurrent_requests_on_two_nodes_create_once(
    db_url: str, upstream: tuple[FakeUpstream, str]
) -> None:
    """Two relay nodes on one PostgreSQL database, 50 requests each with one key at once:
    one create; the other node's requests wait by reading the row."""
    async with (
        rig(db_url, upstream[1]) as one,
        rig(db_url, upstream[1], reset_upstream=False) as two,
    ):
        await one.faults(create_latency_s=0.3)
        requests = [one.create(headers=keyed("k-nodes")) for _ in range(50)]
        requests += [two.create(headers=keyed("k-nodes"), key=one.key) for _ in range(50)]
        answers = await asyncio.gather(*requests)
        assert {a.status_code for a in answers} == {200}, {a.text for a in answers}
        assert len({a.headers["relay-subscription-id"] for a in answers}) == 1
        assert len(await created_ids(one)) == 1


async def test_a_refusal_releases_the_key(proxy: Rig) -> None:
    """An upstream refusal created nothing: the key is free again, so the same request
    retried with it (after topping up credits) creates once and is not a replay."""
    await proxy.faults(create_refusal=402)
    refused = await proxy.create(headers=keyed("k-credits"))
    assert refused.status_code == 402
    await proxy.faults(create_refusal=None)
    retried = await proxy.create(headers=keyed("k-credits"))
    assert retried.status_code == 200, retried.text
    assert "idempotent-replayed" not in retried.headers
    assert [c["status"] for c in await proxy.upstream_creates()] == [402, 200]


async def test_an_upstream_server_error_is_remembered(proxy: Rig) -> None:
    """An upstream 500 may follow a create it made before failing: the retry gets the 500
    again (Idempotent-Replayed), never a second create."""
    await proxy.faults(create_refusal=500)
    first = await proxy.create(headers=keyed("k-500"))
    assert first.status_code == 500
    await proxy.faults(create_refusal=None)
    again = await proxy.create(headers=keyed("k-500"))
    assert (again.status_code, again.content) == (500, first.content)
    assert again.headers["idempotent-replayed"] == "true"
    assert len(await proxy.upstream_creates()) == 1


async def test_duplicates_waiting_on_a_refusal_get_the_refusal(proxy: Rig) -> None:
    """Requests that waited for a first one that was refused (429) get that answer, its
    Retry-After included, instead of each trying the upstream in turn."""
    await proxy.faults(create_refusal=429, retry_after_s=3, create_latency_s=0.3)
    answers = await asyncio.gather(*(proxy.create(headers=keyed("k-429")) for _ in range(10)))
    assert {(a.status_code, a.headers.get("retry-after")) for a in answers} == {(429, "3")}
    assert len(await created_ids(proxy)) == 1


async def test_a_timeout_is_remembered_and_never_created_again(
    db_url: str, upstream: tuple[FakeUpstream, str]
) -> None:
    """A create the upstream may have made (it did not answer in time) is answered 504, and
    a retry gets that 504 again rather than a second create."""
    async with rig(db_url, upstream[1], upstream_timeout_s=0.3) as proxy:
        await proxy.faults(create_answer_delay_s=1.0)  # made at once, answered late
        first = await proxy.create(headers=keyed("k-slow"))
        expect_error(first, 504, "upstream_timeout")
        await proxy.faults(create_answer_delay_s=0.0)
        again = await proxy.create(headers=keyed("k-slow"))
        expect_error(again, 504, "upstream_timeout")
        assert again.headers["idempotent-replayed"] == "true"
        assert len(await proxy.upstream_creates()) == 1


async def test_an_answer_without_an_id_is_remembered(proxy: Rig) -> None:
    """A 2xx without an id may have created a generation: its 502 is replayed, no second
    create."""
    await proxy.faults(create_without_id=True)
    first = await proxy.create(headers=keyed("k-noid"))
    expect_error(first, 502, "upstream_invalid_answer")
    await proxy.faults(create_without_id=False)
    again = await proxy.create(headers=keyed("k-noid"))
    expect_error(again, 502, "upstream_invalid_answer")
    assert len(await proxy.upstream_creates()) == 1


async def test_a_body_over_the_limit_releases_the_key(
    db_url: str, upstream: tuple[FakeUpstream, str]
) -> None:
    """Cut off mid-stream (413), nothing was created: a retry with a smaller body and the
    same key creates."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 20_000

    async with rig(db_url, upstream[1], proxy_max_body_bytes=100_000) as proxy:
        too_big = await proxy.create(
            content=chunks(), headers=keyed("k-big", **{"content-type": "application/json"})
        )
        expect_error(too_big, 413, "payload_too_large")
        retried = await proxy.create(headers=keyed("k-big"))
        assert retried.status_code == 200, retried.text
        assert len(await created_ids(proxy)) == 1


async def test_a_client_that_gives_up_can_collect_the_answer(proxy: Rig) -> None:
    """The client times out while the upstream works; the relay still commits the answer
    and the subscription, and the retry with the key gets them: one create."""
    await proxy.faults(create_answer_delay_s=1.0)
    with pytest.raises(httpx.ReadTimeout):
        await proxy.relay.post(
            "/v1/generation/flux/dev",
            content=orjson.dumps({"prompt": "a cat"}),  # what Rig.create sends
            headers={
                "authorization": f"Bearer {proxy.key}",
                "content-type": "application/json",
                "relay-callback-url": "http://93.184.216.34/hook",
                "idempotency-key": "k-impatient",
            },
            timeout=0.3,
        )
    collected = await proxy.create(headers=keyed("k-impatient"))
    assert collected.status_code == 200, collected.text
    assert collected.headers["idempotent-replayed"] == "true"
    assert len(await created_ids(proxy)) == 1
    (sub,) = await proxy.subscriptions()
    assert sub["id"] == collected.headers["relay-subscription-id"]


async def held_elsewhere(db: Database, proxy: Rig, name: str, lease_s: float) -> None:
    """Claim `name` for the request `proxy.create` sends, as another node would."""
    key_id = await store.authenticate(db, store.hash_api_key(proxy.key))
    assert key_id is not None
    target = hashlib.sha256(orjson.dumps([PUBLIC_HOOK, None])).hexdigest()
    fingerprint = store.RequestFingerprint(f"POST {MODEL_PATH}", target)
    ref = store.IdempotencyRef(key_id, name, "node_elsewhere")
    assert await store.claim_idempotency_key(db, ref, fingerprint, lease_s) is None


async def test_a_key_whose_holder_died_is_never_created_again(proxy: Rig, db: Database) -> None:
    """A key left in progress by a holder whose lease ran out (it died between the upstream's
    answer and the commit): 409 idempotency_outcome_unknown, and no create."""
    await held_elsewhere(db, proxy, "k-dead", lease_s=0.01)
    await asyncio.sleep(0.05)
    for _ in range(2):
        unknown = await proxy.create(headers=keyed("k-dead"))
        error = expect_error(unknown, 409, "idempotency_outcome_unknown")
        assert "will not create it again" in error.error.message
    assert await created_ids(proxy) == []


async def test_a_duplicate_waits_only_so_long(
    proxy: Rig, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another live process holds the key past the wait, a duplicate gets 409
    idempotency_in_progress with Retry-After, and nothing is created."""
    monkeypatch.setattr(idempotency, "WAIT_MAX_S", 0.5)
    await held_elsewhere(db, proxy, "k-busy", lease_s=30)
    answer = await proxy.create(headers=keyed("k-busy"))
    expect_error(answer, 409, "idempotency_in_progress")
    assert answer.headers["retry-after"] == "1"
    assert await created_ids(proxy) == []


async def test_keys_are_forgotten_after_24_hours(proxy: Rig, db: Database) -> None:
    """A key older than 24 hours creates afresh, and housekeeping deletes old keys."""

    async def age_every_key() -> None:
        async with db.transaction() as conn:
            await conn.execute(
                update(idempotency_keys).values(created_at=db.now() - timedelta(hours=25))
            )

    first = await proxy.create(headers=keyed("k-old"))
    assert first.status_code == 200
    await age_every_key()
    second = await proxy.create(headers=keyed("k-old"))
    assert second.status_code == 200
    assert "idempotent-replayed" not in second.headers
    assert len(await created_ids(proxy)) == 2
    key_id = await store.authenticate(db, store.hash_api_key(proxy.key))
    assert key_id is not None
    ref = store.IdempotencyRef(key_id, "k-old", "node_test")
    assert await store.read_idempotency_key(db, ref) is not None
    await store.prune(db, older_than_s=86400)
    assert await store.read_idempotency_key(db, ref) is not None  # 24 hours not yet past
    await age_every_key()
    await store.prune(db, older_than_s=86400)
    assert await store.read_idempotency_key(db, ref) is None
