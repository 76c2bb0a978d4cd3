"""The HTTP API against the contract, over real HTTP on loopback and in-process.

Every test runs twice per database: through uvicorn on a real socket (httpx.AsyncClient) and
through Starlette's TestClient (in-process, lifespan included). Apps run with `role="api"`,
so nothing polls or delivers. Most tests share one app per (database, transport) and isolate
themselves with a fresh client key; tests that need other settings start their own app.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest

from relay import migrate, store
from relay.app import create_app
from relay.schemas import AttemptList, ErrorBody, Health, Readiness, SubscriptionList
from tests.apiclient import (
    OTHER_PUBLIC_HOOK,
    PUBLIC_HOOK,
    TRANSPORTS,
    Api,
    TestClient,
    connect,
    expect,
    expect_error,
    expect_subscription,
    running,
)
from tests.helpers import (
    PG_AVAILABLE,
    create_pg_database,
    drop_pg_database,
    fast_settings,
    new_key,
    open_test_database,
)


@dataclass
class Served:
    """An API-only app shared by a module's tests, with keys the bad-input table uses."""

    db_url: str
    target: str | TestClient
    api_key: str
    revoked_api_key: str
    other_sub_id: str


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def module_db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A migrated database of this module's own (SQLite file, or a new PostgreSQL database)."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('api')}/relay.db"
        migrate.upgrade(url)
        yield url
        return
    if not PG_AVAILABLE:
        if os.environ.get("RELAY_REQUIRE_PG") == "1":
            pytest.fail("PostgreSQL is required (RELAY_REQUIRE_PG=1) but not reachable")
        pytest.skip("PostgreSQL is not reachable")
    url = create_pg_database()
    try:
        migrate.upgrade(url)
        yield url
    finally:
        drop_pg_database(url)


async def _seed(db_url: str) -> tuple[str, str, str]:
    """(a live key, a revoked key, a subscription id of a third key)."""
    db = open_test_database(db_url)
    try:
        live = await store.create_key(db, "table")
        revoked = await store.create_key(db, "revoked")
        assert await store.revoke_key(db, revoked.id)
        other = await store.create_key(db, "other")
        outcome = await store.create_subscriptions(
            db,
            [
                store.CreateRequest(
                    store.hash_api_key(other.api_key), "gen_other", PUBLIC_HOOK, None
                )
            ],
        )
        sub = outcome.results[0].subscription
        assert sub is not None
        return live.api_key, revoked.api_key, sub["id"]
    finally:
        await db.dispose()


@pytest.fixture(scope="module", params=TRANSPORTS)
def served(request: pytest.FixtureRequest, module_db_url: str) -> Iterator[Served]:
    settings = fast_settings(module_db_url, allow_private_callbacks=False)
    api_key, revoked_api_key, other_sub_id = asyncio.run(_seed(module_db_url))
    with running(create_app(settings, role="api"), request.param) as target:
        yield Served(module_db_url, target, api_key, revoked_api_key, other_sub_id)


@pytest.fixture
async def api(served: Served) -> AsyncIterator[Api]:
    async with connect(served.target) as client:
        yield client


@pytest.fixture
async def key(served: Served) -> str:
    """A fresh client key: its subscriptions are this test's alone."""
    return (await new_key(served.db_url)).api_key


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- Create, get, list, cancel --------------------------------------------------------------


async def test_create_is_201_then_200_with_the_same_subscription(api: Api, key: str) -> None:
    """A retried create (same key, generation and URL) answers 200 with the first subscription."""
    first = expect_subscription(
        await api.create(key, "gen_idem", metadata={"order": 42, "tags": ["a"]}), 201
    )
    assert first.generation_id == "gen_idem"
    assert first.callback_url == PUBLIC_HOOK
    assert first.metadata == {"order": 42, "tags": ["a"]}
    assert first.status == "active"
    assert first.attempts == 0
    assert first.last_error is None
    assert first.delivered_at is None
    again = expect_subscription(await api.create(key, "gen_idem"), 200)
    assert again.id == first.id
    listed = expect(await api.request("GET", "/v1/subscriptions", key=key), 200, SubscriptionList)
    assert [s.id for s in listed.items] == [first.id]


async def test_metadata_at_the_limits_is_stored_and_shown_back_exactly(api: Api, key: str) -> None:
    """Metadata 32 levels deep with the extreme 64-bit integers comes back exactly as sent."""
    metadata = {
        "deep": nested(31),
        "max": 2**63 - 1,
        "min": -(2**63),
        "list": [0.1, 1e300, -0.0, True, None, "é\u2028"],
    }
    raw = json.dumps(
        {"generation_id": "gen_meta_limits", "callback_url": PUBLIC_HOOK, "metadata": metadata}
    ).encode()
    created = await api.request("POST", "/v1/subscriptions", key=key, content=raw)
    assert created.status_code == 201, created.text
    assert json.loads(created.content)["metadata"] == metadata
    got = await api.request("GET", f"/v1/subscriptions/{created.json()['id']}", key=key)
    assert json.loads(got.content)["metadata"] == metadata
    assert "9223372036854775807" in got.text and "-9223372036854775808" in got.text


async def test_create_for_another_url_or_generation_is_a_new_subscription(
    api: Api, key: str
) -> None:
    """Only the full (generation, URL) pair is idempotent; changing either creates anew."""
    base = expect_subscription(await api.create(key, "gen_pair"), 201)
    other_url = expect_subscription(await api.create(key, "gen_pair", OTHER_PUBLIC_HOOK), 201)
    other_gen = expect_subscription(await api.create(key, "gen_pair2"), 201)
    assert len({base.id, other_url.id, other_gen.id}) == 3


async def test_another_key_gets_its_own_subscription(api: Api, served: Served, key: str) -> None:
    """The same generation and URL under a different key is a different subscription."""
    other_key = (await new_key(served.db_url, "second")).api_key
    mine = expect_subscription(await api.create(key, "gen_shared"), 201)
    theirs = expect_subscription(await api.create(other_key, "gen_shared"), 201)
    assert mine.id != theirs.id
    listed = expect(
        await api.request("GET", "/v1/subscriptions", key=other_key), 200, SubscriptionList
    )
    assert [s.id for s in listed.items] == [theirs.id]


async def test_create_after_cancel_makes_a_new_subscription(api: Api, key: str) -> None:
    """Idempotency covers active subscriptions only: after a cancel the same create is 201."""
    first = expect_subscription(await api.create(key, "gen_recreate"), 201)
    expect_subscription(await api.request("DELETE", f"/v1/subscriptions/{first.id}", key=key), 200)
    second = expect_subscription(await api.create(key, "gen_recreate"), 201)
    assert second.id != first.id
    assert second.status == "active"


async def test_get_returns_the_subscription(api: Api, key: str) -> None:
    """GET by id answers the subscription exactly as create did."""
    created = expect_subscription(await api.create(key, "gen_get", metadata={"a": None}), 201)
    got = expect_subscription(
        await api.request("GET", f"/v1/subscriptions/{created.id}", key=key), 200
    )
    assert got == created


async def test_list_is_newest_first_and_pages_with_a_cursor(api: Api, key: str) -> None:
    """Pages of `limit` follow `next_cursor` through every subscription once, newest first."""
    created = []
    for n in range(7):
        created.append(expect_subscription(await api.create(key, f"gen_page_{n}"), 201).id)
    # Ids lead with their creation millisecond, so newest first is descending id order.
    stamps = [sub_id[4:14] for sub_id in created]
    assert stamps == sorted(stamps)
    seen: list[str] = []
    cursor: str | None = None
    pages = []
    while True:
        path = "/v1/subscriptions?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = expect(await api.request("GET", path, key=key), 200, SubscriptionList)
        pages.append(len(page.items))
        seen.extend(s.id for s in page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
        assert len(pages) < 10, "pagination does not end"
    assert pages == [3, 3, 1]
    assert seen == sorted(created, reverse=True)


async def test_list_filters_by_status_and_generation_id(api: Api, key: str) -> None:
    """`status` and `generation_id` filter the list, alone and together."""
    a1 = expect_subscription(await api.create(key, "gen_fa"), 201)
    a2 = expect_subscription(await api.create(key, "gen_fa", OTHER_PUBLIC_HOOK), 201)
    b = expect_subscription(await api.create(key, "gen_fb"), 201)
    expect_subscription(await api.request("DELETE", f"/v1/subscriptions/{a2.id}", key=key), 200)

    async def ids(query: str) -> list[str]:
        page = expect(
            await api.request("GET", f"/v1/subscriptions?{query}", key=key), 200, SubscriptionList
        )
        assert page.next_cursor is None
        return [s.id for s in page.items]

    assert await ids("generation_id=gen_fa") == [a2.id, a1.id]
    assert await ids("status=active") == [b.id, a1.id]
    assert await ids("status=canceled") == [a2.id]
    assert await ids("status=active&generation_id=gen_fa") == [a1.id]
    assert await ids("status=delivered") == []
    assert await ids("generation_id=gen_none") == []


async def test_list_limit_defaults_to_50_and_accepts_1_to_500(api: Api, key: str) -> None:
    """Without `limit` a page holds 50; `limit=1` and `limit=500` are accepted."""
    results = await asyncio.gather(*(api.create(key, f"gen_lim_{n}") for n in range(52)))
    assert sorted(r.status_code for r in results) == [201] * 52
    default = expect(await api.request("GET", "/v1/subscriptions", key=key), 200, SubscriptionList)
    assert len(default.items) == 50
    assert default.next_cursor is not None
    one = expect(
        await api.request("GET", "/v1/subscriptions?limit=1", key=key), 200, SubscriptionList
    )
    assert len(one.items) == 1
    assert one.items[0].id == default.items[0].id
    everything = expect(
        await api.request("GET", "/v1/subscriptions?limit=500", key=key), 200, SubscriptionList
    )
    assert len(everything.items) == 52
    assert everything.next_cursor is None
    rest = expect(
        await api.request("GET", f"/v1/subscriptions?cursor={default.next_cursor}", key=key),
        200,
        SubscriptionList,
    )
    assert [s.id for s in default.items + rest.items] == [s.id for s in everything.items]


async def test_cancel_sets_canceled_and_a_second_cancel_keeps_it(api: Api, key: str) -> None:
    """DELETE answers the subscription as canceled; again, it stays canceled."""
    created = expect_subscription(await api.create(key, "gen_cancel"), 201)
    path = f"/v1/subscriptions/{created.id}"
    canceled = expect_subscription(await api.request("DELETE", path, key=key), 200)
    assert canceled.id == created.id
    assert canceled.status == "canceled"
    again = expect_subscription(await api.request("DELETE", path, key=key), 200)
    assert again.status == "canceled"
    got = expect_subscription(await api.request("GET", path, key=key), 200)
    assert got.status == "canceled"


async def test_another_keys_subscription_is_not_found(api: Api, served: Served, key: str) -> None:
    """Get, cancel, attempts and redeliver of another key's subscription are all 404."""
    other_key = (await new_key(served.db_url, "owner")).api_key
    theirs = expect_subscription(await api.create(other_key, "gen_private"), 201)
    base = f"/v1/subscriptions/{theirs.id}"
    for method, path in [
        ("GET", base),
        ("DELETE", base),
        ("GET", f"{base}/attempts"),
        ("POST", f"{base}/redeliver"),
    ]:
        expect_error(await api.request(method, path, key=key), 404, "not_found")
    still = expect_subscription(await api.request("GET", base, key=other_key), 200)
    assert still.status == "active"


async def test_attempts_of_a_new_subscription_are_empty(api: Api, key: str) -> None:
    """A subscription with no delivery yet has an empty attempts list."""
    created = expect_subscription(await api.create(key, "gen_attempts"), 201)
    attempts = expect(
        await api.request("GET", f"/v1/subscriptions/{created.id}/attempts", key=key),
        200,
        AttemptList,
    )
    assert attempts.items == []


async def test_redeliver_before_any_result_is_a_conflict(api: Api, key: str) -> None:
    """Redeliver with no final result stored answers 409 `conflict`, also once canceled."""
    created = expect_subscription(await api.create(key, "gen_redeliver"), 201)
    path = f"/v1/subscriptions/{created.id}/redeliver"
    expect_error(await api.request("POST", path, key=key), 409, "conflict")
    await api.request("DELETE", f"/v1/subscriptions/{created.id}", key=key)
    expect_error(await api.request("POST", path, key=key), 409, "conflict")


async def test_revoked_key_is_refused_at_once(api: Api, served: Served) -> None:
    """The request right after store.revoke_key is 401, with no restart or cache delay."""
    new = await new_key(served.db_url, "to-revoke")
    expect(await api.request("GET", "/v1/subscriptions", key=new.api_key), 200, SubscriptionList)
    db = open_test_database(served.db_url)
    try:
        assert await store.revoke_key(db, new.id)
    finally:
        await db.dispose()
    expect_error(
        await api.request("GET", "/v1/subscriptions", key=new.api_key), 401, "unauthorized"
    )
    expect_error(await api.create(new.api_key, "gen_revoked"), 401, "unauthorized")


# --- Health, readiness ---------------------------------------------------------------------


async def test_healthz_and_readyz_need_no_key_and_have_the_contract_shape(api: Api) -> None:
    """/healthz is 200; /readyz is 200 with database ok and upstream unknown (no worker)."""
    expect(await api.request("GET", "/healthz"), 200, Health)
    ready = expect(await api.request("GET", "/readyz"), 200, Readiness)
    assert ready.database == "ok"
    assert ready.upstream == "unknown"


async def test_readyz_is_503_when_the_database_does_not_answer(
    transport: str, tmp_path: Any
) -> None:
    """/readyz answers 503 with database `unavailable` when the database cannot be opened."""
    url = f"sqlite+aiosqlite:///{tmp_path}/missing/dir/relay.db"
    app = create_app(fast_settings(url, allow_private_callbacks=False), role="api")
    with running(app, transport) as target:
        async with connect(target) as client:
            ready = expect(await client.request("GET", "/readyz"), 503, Readiness)
            assert ready.database == "unavailable"
            expect(await client.request("GET", "/healthz"), 200, Health)
            answer = await client.request("GET", "/v1/subscriptions", key="rk_whatever")
            assert answer.status_code == 503, answer.text
            ErrorBody.model_validate(answer.json())


# --- Rate limiting --------------------------------------------------------------------------


async def test_a_burst_over_the_rate_limit_gets_429_with_retry_after(
    transport: str, db_url: str
) -> None:
    """With RELAY_RATE_LIMIT=2 (burst 4) a burst gets 429 `rate_limited` and Retry-After."""
    app = create_app(
        fast_settings(db_url, allow_private_callbacks=False, rate_limit_per_s=2), role="api"
    )
    fast_key = (await new_key(db_url, "fast")).api_key
    calm_key = (await new_key(db_url, "calm")).api_key
    with running(app, transport) as target:
        async with connect(target) as client:
            answers = [
                await client.request("GET", "/v1/subscriptions", key=fast_key) for _ in range(10)
            ]
            assert answers[0].status_code == 200
            limited = [a for a in answers if a.status_code == 429]
            assert limited, [a.status_code for a in answers]
            assert all(a.status_code in (200, 429) for a in answers)
            for answer in limited:
                expect_error(answer, 429, "rate_limited")
                assert int(answer.headers["retry-after"]) >= 1
            limited_create = await client.create(fast_key, "gen_rl")
            expect_error(limited_create, 429, "rate_limited")
            # The limit is per key: another key is not slowed down.
            expect(
                await client.request("GET", "/v1/subscriptions", key=calm_key),
                200,
                SubscriptionList,
            )


# --- The table of bad inputs ----------------------------------------------------------------


class Row(NamedTuple):
    description: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | list[bytes]  # a list is sent chunked, without Content-Length
    status: int
    code: str
    field: str | None
    reason: str | None = None  # a word the details message must contain
    needs_dns: str | None = None  # a host name the row needs to resolve


AUTH = {"authorization": "Bearer {key}", "content-type": "application/json"}
SUBS = "/v1/subscriptions"
OTHER = "/v1/subscriptions/{other_sub}"
MISSING: Any = object()


def body(**fields: Any) -> bytes:
    """A valid create body with `fields` changed (MISSING drops one)."""
    payload = {"generation_id": "gen_1", "callback_url": PUBLIC_HOOK, **fields}
    return json.dumps({k: v for k, v in payload.items() if v is not MISSING}).encode()


def not_json(description: str, raw: bytes) -> Row:
    return Row(description, "POST", SUBS, AUTH, raw, 400, "invalid_json", None)


def too_large(description: str, raw: bytes | list[bytes]) -> Row:
    return Row(description, "POST", SUBS, AUTH, raw, 413, "payload_too_large", None)


def bad_field(description: str, field: str, **changes: Any) -> Row:
    return Row(description, "POST", SUBS, AUTH, body(**changes), 422, "validation_error", field)


def bad_url(description: str, url: str) -> Row:
    return bad_field(description, "callback_url", callback_url=url)


def private(url: str, dns: str | None = None) -> Row:
    row = bad_url(f"private callback {url}", url)
    return row._replace(reason="private", needs_dns=dns)


def not_found(description: str, method: str, path: str) -> Row:
    return Row(description, method, path, AUTH, b"", 404, "not_found", None)


def bad_query(query: str, field: str) -> Row:
    return Row(f"list {query}", "GET", f"{SUBS}?{query}", AUTH, b"", 422, "validation_error", field)


def unauthorized(description: str, method: str, authorization: str | None, raw: bytes) -> Row:
    headers = {} if authorization is None else {"authorization": authorization}
    path = OTHER if method == "DELETE" else SUBS
    return Row(description, method, path, headers, raw, 401, "unauthorized", None)


def wrong_method(method: str, path: str) -> Row:
    return Row(f"{method} {path}", method, path, AUTH, b"", 405, "method_not_allowed", None)


OVER_64_KIB = {"x": "a" * (64 * 1024 + 1)}


def nested(levels: int) -> dict[str, Any]:
    """A metadata object `levels` levels deep (itself level 1)."""
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def deep_list(levels: int) -> list[Any]:
    value: list[Any] = [1]
    for _ in range(levels - 1):
        value = [value]
    return value


def raw_metadata(description: str, metadata_text: str) -> Row:
    raw = b'{"generation_id": "gen_1", "callback_url": "%s", "metadata": %s}' % (
        PUBLIC_HOOK.encode(),
        metadata_text.encode(),
    )
    return Row(description, "POST", SUBS, AUTH, raw, 422, "validation_error", "metadata")


CHUNKS_OVER_64_KIB = [b'{"metadata": {"x": "', *[b"a" * 8192] * 9, b'"}}']

BAD_INPUTS = [
    # The body is not a JSON object: 400.
    not_json("malformed JSON", b'{"generation_id": "gen_1",'),
    not_json("empty body", b""),
    not_json("body not UTF-8", b"\xff\xfe{}"),
    not_json("JSON array body", b'[{"generation_id": "gen_1"}]'),
    not_json("JSON string body", b'"gen_1"'),
    not_json("JSON number body", b"42"),
    not_json("JSON null body", b"null"),
    # Wrong types, missing and unknown fields: 422 naming the field.
    bad_field("generation_id is a number", "generation_id", generation_id=123),
    bad_field("generation_id is null", "generation_id", generation_id=None),
    bad_field("callback_url is a list", "callback_url", callback_url=[PUBLIC_HOOK]),
    bad_field("callback_url is a number", "callback_url", callback_url=7),
    bad_field("metadata is a string", "metadata", metadata="x"),
    bad_field("metadata is a list", "metadata", metadata=[1, 2]),
    bad_field("missing generation_id", "generation_id", generation_id=MISSING),
    bad_field("missing callback_url", "callback_url", callback_url=MISSING),
    Row("empty object", "POST", SUBS, AUTH, b"{}", 422, "validation_error", "generation_id"),
    bad_field("unknown field", "colour", colour="red"),
    # Sizes.
    too_large("body over 64 KiB", body(metadata=OVER_64_KIB)),
    too_large("body over 64 KiB, chunked", CHUNKS_OVER_64_KIB),
    bad_field("metadata over 4 KiB", "metadata", metadata={"x": "a" * 4100}),
    # Metadata: depth and numbers (refused, never changed).
    bad_field("metadata 33 levels deep", "metadata", metadata=nested(33)),
    bad_field("metadata 300 levels deep", "metadata", metadata=nested(300)),
    bad_field("metadata array 40 levels deep", "metadata", metadata={"a": deep_list(39)}),
    raw_metadata("metadata integer 2**64", '{"n": 18446744073709551616}'),
    raw_metadata("metadata integer 2**63", '{"n": 9223372036854775808}'),
    raw_metadata("metadata integer below -2**63", '{"n": [-9223372036854775809]}'),
    raw_metadata("metadata integer of 400 digits", '{"n": %s}' % ("9" * 400)),
    raw_metadata("metadata NaN", '{"n": NaN}'),
    raw_metadata("metadata Infinity", '{"n": {"m": Infinity}}'),
    raw_metadata("metadata -Infinity", '{"n": -Infinity}'),
    raw_metadata("metadata 1e400", '{"n": 1e400}'),
    not_json(
        "metadata nested past the parser's limit",
        b'{"metadata": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001,
    ),
    # generation_id.
    bad_field("generation_id of 129 characters", "generation_id", generation_id="g" * 129),
    bad_field("generation_id with a slash", "generation_id", generation_id="gen/1"),
    bad_field("generation_id with a space", "generation_id", generation_id="gen 1"),
    bad_field("generation_id not ASCII", "generation_id", generation_id="gén_1"),
    bad_field("generation_id empty", "generation_id", generation_id=""),
    bad_field("generation_id of one dot", "generation_id", generation_id="."),
    bad_field("generation_id of two dots", "generation_id", generation_id=".."),
    # callback_url syntax.
    bad_url("callback_url with ftp scheme", "ftp://93.184.216.34/hook"),
    bad_url("callback_url relative", "/hooks/gen"),
    bad_url("callback_url without a host", "http:///hook"),
    bad_url("callback_url with user:pass", "http://user:pass@93.184.216.34/hook"),
    bad_url("callback_url over 2048 characters", "http://93.184.216.34/" + "a" * 2048),
    bad_url("callback_url with a space", "http://93.184.216.34/a b"),
    bad_url("callback_url over 2048 bytes as UTF-8", "http://93.184.216.34/" + "é" * 1020),
    bad_url("callback_url empty", ""),
    bad_url("callback_url with a bad port", "http://93.184.216.34:99999/hook"),
    # Private callback URLs (this module's app does not allow private callbacks).
    private("http://127.0.0.1/"),
    private("http://localhost/"),
    private("http://LOCALHOST.:8080/hook"),
    private("http://10.0.0.1/"),
    private("http://172.16.5.4/"),
    private("http://192.168.1.1"),
    private("http://100.64.0.1/"),
    private("http://169.254.169.254/"),
    private("http://224.0.0.1/"),
    private("http://[::1]/"),
    private("http://[::ffff:127.0.0.1]/"),
    private("http://[fd00::1]/"),
    private("http://[fe80::1]/"),
    private("http://0.0.0.0/"),
    private("http://2130706433/"),
    private("http://0x7f.1/"),
    private("http://127.1/"),
    private("http://localtest.me/", dns="localtest.me"),
    # Bad subscription ids: 404 (an id is only ever ours or nothing).
    not_found("id not of our form", "GET", f"{SUBS}/nope"),
    not_found("id of 300 characters", "GET", f"{SUBS}/sub_{'A' * 296}"),
    not_found("id in lowercase", "GET", f"{SUBS}/sub_{'a' * 26}"),
    not_found("well-formed id that does not exist", "GET", f"{SUBS}/sub_{'0' * 26}"),
    not_found("attempts of a bad id", "GET", f"{SUBS}/nope/attempts"),
    not_found("cancel a bad id", "DELETE", f"{SUBS}/nope"),
    not_found("redeliver a bad id", "POST", f"{SUBS}/nope/redeliver"),
    # Another key's subscription: 404 too.
    not_found("get another key's subscription", "GET", OTHER),
    not_found("cancel another key's subscription", "DELETE", OTHER),
    not_found("attempts of another key's subscription", "GET", f"{OTHER}/attempts"),
    not_found("redeliver another key's subscription", "POST", f"{OTHER}/redeliver"),
    # Bad list parameters.
    bad_query("status=bogus", "status"),
    bad_query("limit=0", "limit"),
    bad_query("limit=501", "limit"),
    bad_query("limit=abc", "limit"),
    bad_query("limit=%C2%B2", "limit"),  # "²": a digit to str.isdigit, not to int()
    bad_query("limit=10%0A", "limit"),
    bad_query("limit=-1", "limit"),
    bad_query("limit=1.5", "limit"),
    bad_query("cursor=garbage", "cursor"),
    bad_query("cursor=%25%25%25", "cursor"),
    bad_query("generation_id=a%20b", "generation_id"),
    bad_query("generation_id=.", "generation_id"),
    bad_query("generation_id=..", "generation_id"),
    bad_query(f"cursor=sub_{'I' * 26}", "cursor"),  # I is not a Crockford character
    # An empty value is a value: every list parameter's schema refuses "".
    bad_query("status=", "status"),
    bad_query("generation_id=", "generation_id"),
    bad_query("limit=", "limit"),
    bad_query("cursor=", "cursor"),
    # Keys.
    unauthorized("create with no Authorization", "POST", None, body()),
    unauthorized("list with no Authorization", "GET", None, b""),
    unauthorized("cancel with no Authorization", "DELETE", None, b""),
    unauthorized("Basic scheme", "GET", "Basic dXNlcjpwYXNz", b""),
    unauthorized("Bearer without a key", "GET", "Bearer", b""),
    unauthorized("the key without a scheme", "GET", "{key}", b""),
    unauthorized("unknown key", "GET", "Bearer rk_unknown", b""),
    unauthorized("unknown key creating", "POST", "Bearer rk_unknown", body()),
    unauthorized("unknown key with malformed JSON", "POST", "Bearer rk_unknown", b"{"),
    unauthorized("revoked key", "GET", "Bearer {revoked}", b""),
    unauthorized("revoked key creating", "POST", "Bearer {revoked}", body()),
    # Routes and methods.
    not_found("unknown route", "GET", "/v2/subscriptions"),
    not_found("root path", "GET", "/"),
    wrong_method("PUT", SUBS),
    wrong_method("PATCH", OTHER),
    wrong_method("POST", "/healthz"),
]

_resolved: dict[str, bool] = {}


async def _resolves(host: str) -> bool:
    if host not in _resolved:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(3):
                await loop.getaddrinfo(host, 80, type=socket.SOCK_STREAM)
            _resolved[host] = True
        except (OSError, TimeoutError):
            _resolved[host] = False
    return _resolved[host]


@pytest.mark.parametrize("row", BAD_INPUTS, ids=[row.description for row in BAD_INPUTS])
async def test_bad_input_gets_the_contract_status_and_code(
    row: Row, api: Api, served: Served
) -> None:
    """Each bad input gets its contract status and error code, `details` names the field, no 5xx."""
    if row.needs_dns and not await _resolves(row.needs_dns):
        pytest.skip(f"{row.needs_dns} does not resolve here")
    values = {
        "key": served.api_key,
        "revoked": served.revoked_api_key,
        "other_sub": served.other_sub_id,
    }
    headers = {name: value.format(**values) for name, value in row.headers.items()}
    path = row.path.format(**values)
    if isinstance(row.body, list):
        response = await api.request(row.method, path, headers=headers, chunks=row.body)
        assert "content-length" not in response.request.headers
    else:
        response = await api.request(row.method, path, headers=headers, content=row.body)
    assert response.status_code < 500, response.text
    error = expect_error(response, row.status, row.code)
    if row.status == 422:
        assert error.error.details, response.text
        fields = {detail.field for detail in error.error.details}
        assert row.field in fields, response.text
        if row.reason is not None:
            assert any(row.reason in d.message for d in error.error.details), response.text
    if row.status == 405:
        assert response.headers.get("allow"), "a 405 names the allowed methods"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", SUBS, {"GET", "HEAD", "POST"}),
        ("PATCH", "/v1/subscriptions/sub_x", {"GET", "HEAD", "DELETE"}),
        ("GET", "/v1/subscriptions/sub_x/redeliver", {"POST"}),
        ("POST", "/healthz", {"GET", "HEAD"}),
    ],
)
async def test_a_405_allows_every_method_of_the_path(
    method: str, path: str, allowed: set[str], api: Api, served: Served
) -> None:
    """Allow names every method the path answers, not only those of its first route."""
    response = await api.request(
        method, path, headers={"authorization": f"Bearer {served.api_key}"}
    )
    assert response.status_code == 405, response.text
    assert {m.strip() for m in response.headers["allow"].split(",")} == allowed


async def test_refused_creates_create_nothing(api: Api, served: Served, key: str) -> None:
    """None of the table's refused creates leaves a subscription behind."""
    values = {"key": key, "revoked": served.revoked_api_key, "other_sub": served.other_sub_id}
    creates = [row for row in BAD_INPUTS if row.method == "POST" and row.path == SUBS]
    assert len(creates) > 40
    for row in creates:
        headers = {name: value.format(**values) for name, value in row.headers.items()}
        if isinstance(row.body, list):
            response = await api.request("POST", SUBS, headers=headers, chunks=row.body)
        else:
            response = await api.request("POST", SUBS, headers=headers, content=row.body)
        assert response.status_code == row.status, (row.description, response.text)
    listed = expect(await api.request("GET", SUBS, key=key), 200, SubscriptionList)
    assert listed.items == []
