"""Creates through the relay, over real HTTP against the simulator, on SQLite and PostgreSQL:
every answer of the contract's section, and what reaches the upstream.

The relay runs with `role="api"` (nothing polls or delivers) unless a test needs the whole
loop; the simulator logs every create it gets with its size, sha256 and header names.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select

from relay.database import Database
from relay.models import generations
from relay.schemas import Subscription
from relay.simulator import FakeUpstream
from tests.apiclient import OTHER_PUBLIC_HOOK, PUBLIC_HOOK, expect_error, expect_subscription
from tests.helpers import free_port, new_key, serve_receiver, wait_for
from tests.proxy_support import MODEL_PATH, Rig, proxy_fixtures, rig

upstream, proxy = proxy_fixtures()


async def test_a_json_create_is_passed_through_and_subscribed(proxy: Rig) -> None:
    """The upstream's status, content type and body come back verbatim, with the id of a
    subscription to the new generation; the upstream got the body byte for byte."""
    raw = b'{"prompt": "a cat",   "n": 2}'
    answer = await proxy.create(content=raw, headers={"content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert (body["status"], body["input"]) == ("IN_QUEUE", {"prompt": "a cat", "n": 2})
    (created,) = await proxy.upstream_creates()
    assert created["id"] == body["id"]
    assert created["path"] == MODEL_PATH
    assert (created["bytes"], created["sha256"]) == (len(raw), hashlib.sha256(raw).hexdigest())
    sub_id = answer.headers["relay-subscription-id"]
    (listed,) = await proxy.subscriptions()
    sub = Subscription.model_validate(listed)
    assert (sub.id, sub.generation_id, sub.callback_url) == (sub_id, body["id"], PUBLIC_HOOK)
    assert (sub.status, sub.generation_status, sub.metadata) == ("active", "IN_QUEUE", None)


async def test_metadata_is_stored_on_the_subscription(proxy: Rig) -> None:
    """Relay-Metadata (JSON in UTF-8) becomes the subscription's metadata, exactly as sent."""
    metadata = {"order": 42, "tags": ["a", "ü"], "nested": {"x": None}}
    answer = await proxy.create(headers={"relay-metadata": orjson.dumps(metadata)})
    assert answer.status_code == 200, answer.text
    (listed,) = await proxy.subscriptions()
    assert listed["metadata"] == metadata


async def test_only_what_the_upstream_needs_is_forwarded(proxy: Rig) -> None:
    """The relay's upstream key replaces the client's (the simulator accepts only the
    relay's), and the client's other headers stay behind."""
    answer = await proxy.create(
        headers={
            "cookie": "session=1",
            "x-forwarded-for": "10.0.0.1",
            "x-custom": "1",
            "connection": "keep-alive, x-custom",
            "relay-metadata": "{}",
            "idempotency-key": "k-forwarding",
        }
    )
    assert answer.status_code == 200, answer.text
    (created,) = await proxy.upstream_creates()
    assert set(created["header_names"]) <= {
        "accept",
        "authorization",
        "content-length",
        "content-type",
        "host",
        "user-agent",
    }
    assert "authorization" in created["header_names"]


async def test_a_multipart_upload_is_streamed_byte_exact(proxy: Rig) -> None:
    """A multipart body of several MiB, sent chunked, reaches the upstream byte for byte,
    boundary included in its content type."""
    boundary = "relay-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    payload = bytes(range(256)) * 4096 * 8  # 8 MiB
    tail = f"\r\n--{boundary}--\r\n".encode()
    digest = hashlib.sha256(head + payload + tail).hexdigest()

    async def chunks() -> AsyncIterator[bytes]:
        yield head
        for start in range(0, len(payload), 65536):
            yield payload[start : start + 65536]
        yield tail

    content_type = f"multipart/form-data; boundary={boundary}"
    answer = await proxy.create(content=chunks(), headers={"content-type": content_type})
    assert answer.status_code == 200, answer.text
    assert answer.headers["relay-subscription-id"]
    (created,) = await proxy.upstream_creates()
    assert created["content_type"] == content_type
    assert (created["bytes"], created["sha256"]) == (len(head + payload + tail), digest)


@pytest.mark.parametrize(
    ("headers", "field"),
    [
        ({"relay-callback-url": "http://127.0.0.1:9000/hook"}, "Relay-Callback-Url"),
        ({"relay-callback-url": "ftp://93.184.216.34/hook"}, "Relay-Callback-Url"),
        ({"relay-callback-url": "http://user:pw@93.184.216.34/"}, "Relay-Callback-Url"),
        ({"relay-callback-url": "http://no-such-host.invalid/"}, "Relay-Callback-Url"),
        ({"relay-metadata": "[1, 2]"}, "Relay-Metadata"),
        ({"relay-metadata": "{not json"}, "Relay-Metadata"),
        ({"relay-metadata": orjson.dumps({"x": "y" * 5000}).decode()}, "Relay-Metadata"),
        ({"idempotency-key": "k" * 256}, "Idempotency-Key"),
        ({"idempotency-key": "tab\tkey"}, "Idempotency-Key"),
        ({"idempotency-key": ""}, "Idempotency-Key"),
    ],
)
async def test_bad_relay_headers_are_refused_before_anything_is_forwarded(
    proxy: Rig, headers: dict[str, str | bytes], field: str
) -> None:
    """A refused callback URL, bad metadata or a bad Idempotency-Key is 422 naming the header,
    and the upstream never hears of the request (no credits spent)."""
    sent: dict[str, str | bytes] = {"relay-callback-url": PUBLIC_HOOK, **headers}
    answer = await proxy.create(callback_url=None, headers=sent)
    error = expect_error(answer, 422, "validation_error")
    assert error.error.details is not None
    assert [d.field.split(".")[0] for d in error.error.details] == [field], answer.text
    assert "the body" not in error.error.details[0].message
    assert await proxy.upstream_creates() == []


async def test_a_missing_callback_url_is_refused(proxy: Rig) -> None:
    """Relay-Callback-Url is required: 422, nothing forwarded."""
    answer = await proxy.create(callback_url=None)
    error = expect_error(answer, 422, "validation_error")
    assert error.error.details is not None
    assert [(d.field, d.message) for d in error.error.details] == [
        ("Relay-Callback-Url", "required")
    ]
    assert await proxy.upstream_creates() == []


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "json"]
)
async def test_a_body_the_upstream_does_not_take_is_refused(
    proxy: Rig, content_type: str | None
) -> None:
    """Only JSON and multipart bodies are forwarded (the upstream's); anything else, no body
    at all included, is 415 before it costs a create."""
    headers = {} if content_type is None else {"content-type": content_type}
    answer = await proxy.create(content=b"" if content_type is None else b"{}", headers=headers)
    error = expect_error(answer, 415, "unsupported_media_type")
    assert "nothing was created upstream" in error.error.message
    assert await proxy.upstream_creates() == []


async def test_media_type_parameters_and_case_are_accepted(proxy: Rig) -> None:
    """`Application/JSON; charset=utf-8` is JSON."""
    headers = {"content-type": "Application/JSON; charset=utf-8"}
    answer = await proxy.create(content=b'{"prompt": "a cat"}', headers=headers)
    assert answer.status_code == 200, answer.text
    assert len(await proxy.upstream_creates()) == 1


async def test_the_key_is_checked_first(proxy: Rig) -> None:
    """No key, or an unknown one, is 401 even with bad headers; nothing is forwarded."""
    expect_error(await proxy.relay.post(MODEL_PATH, content=b"{}"), 401, "unauthorized")
    answer = await proxy.create(key="rk_unknown", callback_url="ftp://x")
    expect_error(answer, 401, "unauthorized")
    assert await proxy.upstream_creates() == []


@pytest.mark.parametrize(
    "path",
    [
        "/v1/generation/flux/",
        "/v1/generation/flux/..",
        "/v1/generation/flux/a%2F..%2F..%2Fx",
        "/v1/generation/flux/a//b",
        "/v1/generation/fl%20ux/dev",
        "/v1/generation/sse/flux/dev",
    ],
)
async def test_a_path_that_is_not_a_model_is_not_found(proxy: Rig, path: str) -> None:
    """Paths that could leave the upstream's create path, and the streaming create (the
    relay follows streams itself), are 404; nothing is forwarded."""
    expect_error(await proxy.create(path=path), 404, "not_found")
    assert await proxy.upstream_creates() == []


async def test_a_declared_body_over_the_limit_is_refused_unread(
    db_url: str, upstream: tuple[FakeUpstream, str]
) -> None:
    """A Content-Length over RELAY_PROXY_MAX_BODY is 413 before the upstream is called."""
    async with rig(db_url, upstream[1], proxy_max_body_bytes=1000) as proxy:
        answer = await proxy.create(
            content=b"x" * 1001, headers={"content-type": "application/json"}
        )
        error = expect_error(answer, 413, "payload_too_large")
        assert "1000 bytes" in error.error.message
        assert await proxy.upstream_creates() == []


async def test_a_chunked_body_over_the_limit_is_cut_off_mid_stream(
    db_url: str, upstream: tuple[FakeUpstream, str]
) -> None:
    """A body sent without a length is counted as it streams: past the limit the upload to
    the upstream is aborted (nothing created) and the client gets 413."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 20_000

    async with rig(db_url, upstream[1], proxy_max_body_bytes=100_000) as proxy:
        answer = await proxy.create(content=chunks(), headers={"content-type": "application/json"})
        expect_error(answer, 413, "payload_too_large")
        assert [c for c in await proxy.upstream_creates() if c["id"] is not None] == []
        assert await proxy.subscriptions() == []


async def test_a_slow_upload_that_keeps_coming_is_not_cut_off(
    db_url: str, upstream: tuple[FakeUpstream, str]
) -> None:
    """With RELAY_BODY_TIMEOUT=1 an upload that keeps arriving at 192 KiB/s for 3.5 s is
    created and byte-exact upstream (each 64 KiB received buys a second), while a body
    trickling at 5 KiB/s is answered 408 soon after its second is up."""
    boundary = "slow-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    piece = bytes(range(256)) * 384  # 96 KiB
    content_type = f"multipart/form-data; boundary={boundary}"

    async def steady() -> AsyncIterator[bytes]:
        yield head
        for _ in range(8):
            await asyncio.sleep(0.5)
            yield piece
        yield tail

    async with rig(db_url, upstream[1], body_timeout_s=1.0) as proxy:
        started = time.monotonic()
        answer = await proxy.create(content=steady(), headers={"content-type": content_type})
        assert answer.status_code == 200, answer.text
        assert time.monotonic() - started > 3.5
        (created,) = await proxy.upstream_creates()
        body = head + piece * 8 + tail
        assert (created["bytes"], created["sha256"]) == (
            len(body),
            hashlib.sha256(body).hexdigest(),
        )

        # The trickle over a raw socket: httpx would still be sending when the 408 comes.
        host, port = str(proxy.relay.base_url).removeprefix("http://").rstrip("/").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            (
                f"POST {MODEL_PATH} HTTP/1.1\r\nhost: {host}\r\n"
                f"authorization: Bearer {proxy.key}\r\nrelay-callback-url: {PUBLIC_HOOK}\r\n"
                f"content-type: {content_type}\r\ntransfer-encoding: chunked\r\n\r\n"
                f"{len(head):x}\r\n"
            ).encode()
            + head
            + b"\r\n"
        )

        async def trickle() -> None:  # 1 KiB every 0.2 s, until the relay hangs up
            with contextlib.suppress(ConnectionError):
                for _ in range(40):
                    await asyncio.sleep(0.2)
                    writer.write(b"400\r\n" + b"t" * 1024 + b"\r\n")
                    await writer.drain()

        started = time.monotonic()
        sending = asyncio.create_task(trickle())
        try:
            async with asyncio.timeout(10):
                raw = await reader.read()  # to the end: the relay closes the connection
            waited_s = time.monotonic() - started
        finally:
            sending.cancel()
            writer.close()
        status_line, _, rest = raw.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 408 "), raw
        assert orjson.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
        assert 0.9 < waited_s < 4, waited_s
        assert len(await proxy.subscriptions()) == 1


@pytest.mark.parametrize("status", [402, 422, 429, 500])
async def test_upstream_refusals_pass_through_without_a_subscription(
    proxy: Rig, status: int
) -> None:
    """402, 422, 429 (with its Retry-After) and 500 come back with the upstream's status and
    body, and no subscription is made."""
    await proxy.faults(create_refusal=status, retry_after_s=7)
    answer = await proxy.create()
    assert answer.status_code == status
    (created,) = await proxy.upstream_creates()
    assert created["status"] == status
    body = answer.json()
    assert set(body) >= {"error", "message"}, body
    assert "relay-subscription-id" not in answer.headers
    assert (answer.headers.get("retry-after") == "7") == (status == 429)
    assert await proxy.subscriptions() == []


async def test_an_accepted_create_without_an_id_is_502(proxy: Rig) -> None:
    """A 2xx without a generation id cannot be subscribed to: 502 upstream_invalid_answer."""
    await proxy.faults(create_without_id=True)
    error = expect_error(await proxy.create(), 502, "upstream_invalid_answer")
    assert "may have been created" in error.error.message
    assert len(await proxy.upstream_creates()) == 1
    assert await proxy.subscriptions() == []


async def test_an_unreachable_upstream_is_502(db_url: str) -> None:
    """Nothing listens at the upstream's address: 502 upstream_unavailable, and the message
    says nothing was created."""
    async with rig(db_url, f"http://127.0.0.1:{free_port()}", reset_upstream=False) as proxy:
        error = expect_error(await proxy.create(), 502, "upstream_unavailable")
        assert "nothing was created" in error.error.message
        assert await proxy.subscriptions() == []


async def test_an_upstream_that_does_not_answer_in_time_is_504(
    db_url: str, upstream: tuple[FakeUpstream, str]
) -> None:
    """The upstream takes longer than RELAY_UPSTREAM_TIMEOUT to answer: 504 upstream_timeout,
    no subscription."""
    async with rig(db_url, upstream[1], upstream_timeout_s=0.3) as proxy:
        await proxy.faults(create_latency_s=1.0)
        error = expect_error(await proxy.create(), 504, "upstream_timeout")
        assert "may have been created" in error.error.message
        assert await proxy.subscriptions() == []


async def test_the_whole_loop_delivers_the_final_result(
    db_url: str, upstream: tuple[FakeUpstream, str]
) -> None:
    """Created through the relay, the generation is polled and its final result delivered
    to Relay-Callback-Url, with the subscription's id."""
    with serve_receiver() as receiver:
        async with rig(db_url, upstream[1], role="all", allow_private_callbacks=True) as proxy:
            answer = await proxy.create(callback_url=f"{receiver.url}/done")
            assert answer.status_code == 200, answer.text
            gen_id = answer.json()["id"]
            finished = await proxy.upstream.post(f"/_fake/generations/{gen_id}/finish")
            assert finished.status_code == 200, finished.text
            await wait_for(lambda: receiver.on("/done"), timeout_s=20)
            (hook,) = receiver.on("/done")
            assert hook.headers["relay-subscription-id"] == answer.headers["relay-subscription-id"]
            delivered: dict[str, Any] = orjson.loads(hook.body)
            assert (delivered["id"], delivered["status"]) == (gen_id, finished.json()["status"])


# --- Ownership ------------------------------------------------------------------------------


async def test_a_generation_created_through_the_relay_belongs_to_its_key(proxy: Rig) -> None:
    """Another key subscribing to it by id gets 404 not_found (nothing made); the creating
    key may subscribe more callbacks; a generation created elsewhere stays open to all."""
    answer = await proxy.create()
    assert answer.status_code == 200, answer.text
    gen_id = answer.json()["id"]
    other = (await new_key(proxy.db_url, "other")).api_key

    async def subscribe(key: str, generation_id: str, url: str) -> httpx.Response:
        return await proxy.relay.post(
            "/v1/subscriptions",
            headers={"authorization": f"Bearer {key}"},
            json={"generation_id": generation_id, "callback_url": url},
        )

    error = expect_error(await subscribe(other, gen_id, PUBLIC_HOOK), 404, "not_found")
    assert "generation" in error.error.message
    assert await proxy.subscriptions(other) == []
    expect_subscription(await subscribe(proxy.key, gen_id, OTHER_PUBLIC_HOOK), 201)
    assert len(await proxy.subscriptions()) == 2
    expect_subscription(await subscribe(other, "gen_made_elsewhere", PUBLIC_HOOK), 201)
    expect_subscription(await subscribe(proxy.key, "gen_made_elsewhere", PUBLIC_HOOK), 201)


async def test_another_key_does_not_wake_an_owned_generation(proxy: Rig, db: Database) -> None:
    """Once its owner canceled, an owned generation stays idle when another key asks for it
    (404), and polls again when its owner subscribes anew."""
    answer = await proxy.create()
    gen_id = answer.json()["id"]
    auth = {"authorization": f"Bearer {proxy.key}"}
    sub_id = answer.headers["relay-subscription-id"]
    canceled = await proxy.relay.delete(f"/v1/subscriptions/{sub_id}", headers=auth)
    assert canceled.status_code == 200, canceled.text

    async def state() -> str:
        async with db.reader() as conn:
            found = await conn.execute(
                select(generations.c.state).where(generations.c.id == gen_id)
            )
            return str(found.scalar_one())

    assert await state() == "idle"
    other = (await new_key(proxy.db_url, "other")).api_key
    body = {"generation_id": gen_id, "callback_url": PUBLIC_HOOK}
    refused = await proxy.relay.post(
        "/v1/subscriptions", headers={"authorization": f"Bearer {other}"}, json=body
    )
    expect_error(refused, 404, "not_found")
    assert await state() == "idle"
    again = await proxy.relay.post("/v1/subscriptions", headers=auth, json=body)
    expect_subscription(again, 201)
    assert await state() == "polling"
