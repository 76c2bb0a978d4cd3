"""The upstream client against a real server on loopback that records the raw request line:
what the HTTP client really sends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import unquote

import pytest

from relay.upstream import UpstreamClient


@contextlib.asynccontextmanager
async def raw_server(answer: bytes) -> AsyncIterator[tuple[str, list[str]]]:
    """A TCP server that records each request line and answers `answer` (a whole HTTP
    response) before closing; yields its base URL and the request lines seen."""
    lines: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = await reader.readline()
        lines.append(request_line.decode("latin-1").rstrip("\r\n"))
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/api", lines
    finally:
        server.close()
        await server.wait_closed()


NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"

# Ids the contract's rule refuses, and worse: none may change the path polled.
HOSTILE_IDS = [
    "..",
    ".",
    "...",
    "../admin",
    "a/../../admin",
    "%2e%2e",
    "%2E%2E/x",
    "gen?x=1#frag",
    "gen\\..\\x",
    "gén 1",
    "gen.1",
]


@pytest.mark.parametrize("generation_id", HOSTILE_IDS)
async def test_no_id_changes_the_path_the_client_sends(generation_id: str) -> None:
    """The request target is /api/v1/generation/<one segment>, that segment decodes to the id,
    and it holds no "." that a server could read as a dot segment."""
    async with raw_server(NOT_FOUND) as (base, lines):
        client = UpstreamClient(base, "k", timeout_s=5)
        try:
            async with asyncio.timeout(10):
                result = await client.poll(generation_id)
        finally:
            await client.aclose()
    assert result.kind == "not_found"
    assert len(lines) == 1
    method, target, _ = lines[0].split(" ")
    assert method == "GET"
    prefix = "/api/v1/generation/"
    assert target.startswith(prefix), target
    segment = target.removeprefix(prefix)
    assert "/" not in segment and "?" not in segment and "#" not in segment, target
    assert "." not in segment, target
    assert unquote(segment) == generation_id


def _ok_body(size: int) -> bytes:
    body = b'{"id": "gen_big", "status": "COMPLETED", "pad": "' + b"x" * size + b'"}'
    head = f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    return head.encode() + body


async def test_an_upstream_body_over_the_cap_is_refused_unread() -> None:
    """By default a poll reads at most 1 MiB: a 1.5 MiB answer is an error, a 0.9 MiB one is
    kept; RELAY_UPSTREAM_MAX_BODY (max_body_bytes) moves the cap."""
    for size, max_body, kind in [
        (1536 * 1024, None, "error"),
        (900 * 1024, None, "ok"),
        (900 * 1024, 512 * 1024, "error"),
    ]:
        async with raw_server(_ok_body(size)) as (base, _):
            if max_body is None:
                client = UpstreamClient(base, "k", timeout_s=5)
            else:
                client = UpstreamClient(base, "k", timeout_s=5, max_body_bytes=max_body)
            try:
                result = await client.poll("gen_big")
            finally:
                await client.aclose()
        assert result.kind == kind, (size, max_body, result.error)
        if kind == "error":
            assert result.error is not None and "upstream body over" in result.error
