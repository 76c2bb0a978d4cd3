"""The wrapper around the whole app (relay/guards.py) and the server's bounds, over real HTTP
on loopback: the last-resort answer to an unexpected failure, the deadline for a request
body, and the cap on open connections."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay import store
from relay.app import create_app
from relay.guards import Guard
from relay.http import ApiError, error_response
from tests.apiclient import expect_error
from tests.helpers import fast_settings, new_key, relay_process, serve_in_thread


async def test_an_unexpected_failure_is_a_500_in_the_error_shape_logged_once_in_full(
    db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug behind a route answers 500 `internal_error` as JSON; its traceback is logged
    once, a repeat is one line, and the key is never logged."""

    async def broken(*args: Any) -> None:
        raise RuntimeError("a bug the tests planted")

    # A bug cannot be produced on demand through the real store: plant one.
    monkeypatch.setattr(store, "get_subscription", broken)
    key = await new_key(db_url)
    caplog.set_level(logging.ERROR)
    with serve_in_thread(create_app(fast_settings(db_url), role="api")) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            headers = {"authorization": f"Bearer {key.api_key}"}
            path = f"/v1/subscriptions/sub_{'0' * 26}"
            for _ in range(3):
                response = await client.get(path, headers=headers)
                error = expect_error(response, 500, "internal_error")
                assert "bug" not in error.error.message
            # The app still answers everything else.
            assert (await client.get("/healthz")).status_code == 200
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 1, caplog.text
    assert "a bug the tests planted" in caplog.text
    assert caplog.text.count("unexpected RuntimeError") == 2
    assert key.api_key not in caplog.text


async def test_a_body_sent_too_slowly_gets_408_in_the_error_shape(db_url: str) -> None:
    """A create whose body has not arrived RELAY_BODY_TIMEOUT (0.5 s) after it began is
    answered 408 `request_timeout` and its connection closed."""
    key = await new_key(db_url)
    settings = dataclasses.replace(fast_settings(db_url), body_timeout_s=0.5)
    with serve_in_thread(create_app(settings, role="api")) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(
                (
                    f"POST /v1/subscriptions HTTP/1.1\r\nhost: {host}\r\n"
                    f"authorization: Bearer {key.api_key}\r\ncontent-length: 100\r\n\r\n"
                    '{"generation_id": '
                ).encode()
            )
            await writer.drain()
            started = time.monotonic()
            async with asyncio.timeout(5):
                answer = await reader.read()  # to the end: the connection is closed
            waited_s = time.monotonic() - started
        finally:
            writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert 0.3 < waited_s < 3


async def test_connections_beyond_relay_max_connections_get_503(tmp_path: Path) -> None:
    """`relay serve` with RELAY_MAX_CONNECTIONS=4: with 4 connections open, a request on a
    fifth is answered 503 at once; once they close, requests are served again."""
    env = {
        "RELAY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/relay.db",
        "RELAY_MAX_CONNECTIONS": "4",
        "RELAY_UPSTREAM_API_KEY": "k",
    }
    async with relay_process(env, tmp_path / "serve.log") as (_, base_url):
        host, port = base_url.removeprefix("http://").split(":")
        idle = [await asyncio.open_connection(host, int(port)) for _ in range(4)]
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient(base_url=base_url, timeout=5) as client:
            refused = await client.get("/healthz")
            assert refused.status_code == 503
            for _, writer in idle:
                writer.close()
            await asyncio.sleep(0.3)
            assert (await client.get("/healthz")).status_code == 200


async def _lifespan(scope: Any, receive: Any, send: Any) -> bool:
    """Serve a bare test app's lifespan; True if `scope` was the lifespan."""
    if scope["type"] != "lifespan":
        return False
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})
    return True


async def test_a_failure_after_the_answer_began_ends_the_connection_without_a_second_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under uvicorn, a handler that fails after its response began (a stream, say) is
    logged once and its connection closed with what was sent, never a 500 appended to it;
    the server goes on serving. (A bare app stands in for such a route: none fails on cue.)"""

    async def streams_then_fails(scope: Any, receive: Any, send: Any) -> None:
        if await _lifespan(scope, receive, send):
            return
        if scope["path"] == "/ok":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"fine"})
            return
        headers = [(b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("failed mid-stream")

    caplog.set_level(logging.ERROR)
    with serve_in_thread(Guard(streams_then_fails, body_timeout_s=5)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/stream")
            ok = await client.get("/ok")
    assert (ok.status_code, ok.text) == (200, "fine")
    assert "internal_error" not in caplog.text
    logged = [r for r in caplog.records if r.name == "relay.guards"]
    assert len(logged) == 1 and "failed mid-stream" in caplog.text, caplog.text


async def test_a_body_that_came_at_once_is_taken_even_when_the_handler_read_it_late() -> None:
    """Under uvicorn with a 0.2 s body deadline, a handler that works 0.5 s before reading
    (as the key check or the proxy's callback check may) still gets a body the client sent at
    once; a body that never comes is refused 408 as soon as the handler waits for it. (A bare
    app stands in for a slow route: none is slow on cue.)"""

    async def slow_reader(scope: Any, receive: Any, send: Any) -> None:
        if await _lifespan(scope, receive, send):
            return
        await asyncio.sleep(0.5)
        body = b""
        try:
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body", False):
                    break
        except ApiError as exc:  # as the app's exception handler answers it
            await error_response(exc)(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    with serve_in_thread(Guard(slow_reader, body_timeout_s=0.2)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            answer = await client.post("/", content=b'{"sent": "at once"}')
        assert (answer.status_code, answer.content) == (200, b'{"sent": "at once"}')

        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(f"POST / HTTP/1.1\r\nhost: {host}\r\ncontent-length: 10\r\n\r\n".encode())
            await writer.drain()
            started = time.monotonic()
            async with asyncio.timeout(5):
                raw = await reader.read()
            waited_s = time.monotonic() - started
        finally:
            writer.close()
    assert raw.startswith(b"HTTP/1.1 408 "), raw
    assert 0.4 < waited_s < 2, waited_s
