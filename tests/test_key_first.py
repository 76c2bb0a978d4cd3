"""The key is checked before anything else, over real HTTP on loopback: a made-up key costs no
body, no validation and no DNS; unknown keys are limited per client address, never per token;
intake DNS has its own bounded resolver, so a name server that never answers holds up no
delivery."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from sqlalchemy import event
from sqlalchemy.engine import Engine

from relay import migrate, store
from relay.app import create_app
from relay.auth import KEY_CACHE_TTL_S
from relay.resolver import IntakeResolver
from relay.sender import AiohttpSender
from relay.simulator import FakeUpstream
from tests.apiclient import PUBLIC_HOOK, expect_error
from tests.delivery import final_generation
from tests.helpers import (
    Receiver,
    fast_settings,
    new_key,
    open_test_database,
    serve_in_thread,
    wait_for,
)

SUBS = "/v1/subscriptions"


async def _first_answer(base_url: str, authorization: str, wait_s: float = 5.0) -> bytes:
    """Send a create's headers announcing a 200-byte body, and never the body: the answer."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            (
                f"POST {SUBS} HTTP/1.1\r\nhost: {host}\r\nauthorization: {authorization}\r\n"
                "content-type: application/json\r\ncontent-length: 200\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        async with asyncio.timeout(wait_s):
            return await reader.read(4096)
    finally:
        writer.close()


async def test_an_unknown_or_revoked_key_is_refused_before_its_body_is_sent(db_url: str) -> None:
    """A create with a made-up or revoked key is answered 401 while its body has not even
    been sent; a live key's create waits for the body."""
    revoked = await new_key(db_url, "revoked")
    live = await new_key(db_url, "live")
    db = open_test_database(db_url)
    try:
        assert await store.revoke_key(db, revoked.id)
    finally:
        await db.dispose()
    # A short body deadline: the server's shutdown waits for the live key's request.
    settings = fast_settings(db_url, body_timeout_s=1.5)
    with serve_in_thread(create_app(settings, role="api")) as url:
        for token in ("rk_made_up", revoked.api_key):
            answer = await _first_answer(url, f"Bearer {token}")
            assert answer.startswith(b"HTTP/1.1 401 "), answer
            assert b'"unauthorized"' in answer
        try:
            answer = await _first_answer(url, f"Bearer {live.api_key}", wait_s=1)
        except TimeoutError:
            answer = b""
        assert answer == b"", "a live key's create waits for its body"


async def test_unknown_keys_are_limited_per_client_address(db_url: str) -> None:
    """Past RELAY_AUTH_FAILURE_LIMIT (5/s, bursts of 10) made-up keys from one address get
    429 with Retry-After, each token a new one; a live key seen before still creates."""
    live = await new_key(db_url, "live")
    settings = fast_settings(db_url, allow_private_callbacks=False, auth_failure_limit_per_s=5)
    with serve_in_thread(create_app(settings, role="api")) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            own = {"authorization": f"Bearer {live.api_key}"}
            assert (await client.get(SUBS, headers=own)).status_code == 200
            answers = [
                await client.get(SUBS, headers={"authorization": f"Bearer rk_made_up_{i}"})
                for i in range(30)
            ]
            statuses = [a.status_code for a in answers]
            assert statuses[:10] == [401] * 10, statuses
            limited = [a for a in answers if a.status_code == 429]
            assert len(limited) >= 15, statuses
            expect_error(limited[0], 429, "rate_limited")
            assert int(limited[0].headers["retry-after"]) >= 1
            body = {"generation_id": "gen_live", "callback_url": PUBLIC_HOOK}
            created = await client.post(SUBS, json=body, headers=own)
            assert created.status_code == 201, created.text


async def test_made_up_tokens_never_push_a_real_keys_bucket_out(tmp_path: Path) -> None:
    """10,001 made-up tokens do not reset a live key's rate limit: it stays 429. (The limits
    live in memory: SQLite alone is enough here.)"""
    db_url = f"sqlite+aiosqlite:///{tmp_path}/relay.db"
    await asyncio.to_thread(migrate.upgrade, db_url)
    live = await new_key(db_url, "live")
    settings = fast_settings(db_url, rate_limit_per_s=0.001, auth_failure_limit_per_s=0)
    with serve_in_thread(create_app(settings, role="api")) as url:
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            own = {"authorization": f"Bearer {live.api_key}"}
            assert (await client.get(SUBS, headers=own)).status_code == 200
            expect_error(await client.get(SUBS, headers=own), 429, "rate_limited")

            # aiohttp: several times faster than httpx for a flood of small requests.
            connector = aiohttp.TCPConnector(limit=32)
            async with aiohttp.ClientSession(url, connector=connector) as flood:

                async def made_up(i: int) -> int:
                    headers = {"authorization": f"Bearer rk_flood_{i}"}
                    async with flood.get(SUBS, headers=headers) as answer:
                        await answer.read()
                        return answer.status

                for start in range(0, 10_001, 1000):
                    batch = range(start, min(start + 1000, 10_001))
                    statuses = await asyncio.gather(*(made_up(i) for i in batch))
                    assert set(statuses) == {401}
            expect_error(await client.get(SUBS, headers=own), 429, "rate_limited")


@contextlib.contextmanager
def silent_name_server() -> Iterator[int]:
    """A UDP socket on loopback that reads DNS queries and never answers; yields its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


async def test_intake_dns_that_never_answers_holds_up_no_delivery(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """While 40 creates wait on a name server that never answers (and then get 422), a
    callback to `localhost` (resolved by delivery's own resolver) goes out at once."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_dns")
    # The subscription was accepted earlier by a relay allowing private callbacks.
    db = open_test_database(db_url)
    try:
        hook = receiver.url.replace("127.0.0.1", "localhost") + "/hook"
        request = store.CreateRequest(store.hash_api_key(key.api_key), gen.id, hook, None)
        await store.create_subscriptions(db, [request])
    finally:
        await db.dispose()
    settings = fast_settings(db_url, upstream_url, allow_private_callbacks=False)
    with silent_name_server() as port:
        intake = IntakeResolver(nameservers=["127.0.0.1"], port=port, timeout_s=4, max_concurrent=4)
        # This relay's intake refuses private hosts; its delivery (the test's receiver is on
        # loopback) allows them.
        sender = AiohttpSender(allow_private=True, limit=10, limit_per_host=10)
        app = create_app(settings, sender=sender, intake_resolver=intake)
        with serve_in_thread(app) as url:
            async with httpx.AsyncClient(
                base_url=url, timeout=20, headers={"authorization": f"Bearer {key.api_key}"}
            ) as client:
                started = time.monotonic()
                creates = [
                    asyncio.ensure_future(
                        client.post(
                            SUBS,
                            json={
                                "generation_id": f"gen_{i}",
                                "callback_url": f"https://hook-{i}.relay-test.example/x",
                            },
                        )
                    )
                    for i in range(40)
                ]
                await wait_for(lambda: receiver.on("/hook"), timeout_s=3)
                delivered_after_s = time.monotonic() - started
                answers = await asyncio.gather(*creates)
    assert delivered_after_s < 3
    for answer in answers:
        error = expect_error(answer, 422, "validation_error")
        assert "no answer within 4 s" in str(error.error.details), answer.text


@contextlib.contextmanager
def key_lookups() -> Iterator[list[str]]:
    """The statements that look a key up by hash alone (store.authenticate), as any engine in
    this process sends them."""
    seen: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("SELECT api_keys.id \nFROM api_keys"):
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", before)


async def test_creates_that_miss_the_key_cache_together_share_one_lookup(db_url: str) -> None:
    """Sixty creates sent at once with a key not seen for longer than the key cache's TTL:
    all are created, and the key is looked up once (or twice, if the cache expires again
    mid-burst), not once per create: each lookup of its own took a connection, and past the
    pool's size a new one."""
    key = await new_key(db_url, "burst")
    settings = fast_settings(db_url, allow_private_callbacks=False)
    with serve_in_thread(create_app(settings, role="api")) as url:
        async with httpx.AsyncClient(
            base_url=url, timeout=10, headers={"authorization": f"Bearer {key.api_key}"}
        ) as client:

            async def create(n: int) -> int:
                body = {"generation_id": f"gen_miss{n}", "callback_url": PUBLIC_HOOK}
                return (await client.post(SUBS, json=body)).status_code

            assert await create(-1) == 201  # connections warm, the key cached
            await asyncio.sleep(KEY_CACHE_TTL_S + 0.2)
            with key_lookups() as lookups:
                statuses = await asyncio.wait_for(
                    asyncio.gather(*(create(n) for n in range(60))), timeout=20
                )
    assert statuses == [201] * 60
    assert 1 <= len(lookups) <= 2, len(lookups)
