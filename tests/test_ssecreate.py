"""The streaming create's own HTTP client (relay/ssecreate.py) against scripted servers on
real sockets: how it frames the request, reads events however the bytes are cut, passes a
refusal on, and says whether the upstream may have created something when things fail.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from relay.creator import CreateFailed, Upload
from relay.ssecreate import SseCreator

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
EVENT_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of one request, the body de-chunked or read to its length."""
    head = await reader.readuntil(b"\r\n\r\n")
    lowered = head.lower()
    if b"transfer-encoding: chunked" in lowered:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                return head, body
            body += data[:-2]
    length = int(lowered.split(b"content-length: ")[1].split(b"\r\n")[0])
    return head, await reader.readexactly(length)


@contextlib.asynccontextmanager
async def server(script: Script) -> AsyncIterator[str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        finally:
            writer.close()

    listening = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    async with listening:
        yield f"http://127.0.0.1:{port}/api"


async def body_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


class Follower:
    """A StreamListener that records what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bytes]] = []
        self.done = asyncio.Event()
        self.error: BaseException | None = None

    def event(self, key: str, data: bytes) -> None:
        self.events.append((key, data))

    def ended(self, key: str, error: BaseException | None) -> None:
        self.error = error
        self.done.set()


async def test_events_cut_anywhere_are_read_in_order() -> None:
    """The request goes out chunked to the streaming path with the relay's headers; the
    answer is the first event, and later events, cut at odd places and with comments in
    between, reach the listener in order, then the end."""
    seen: dict[str, bytes] = {}

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["head"], seen["body"] = await read_request(reader)
        stream = (
            b'data: {"id": "gen_1", "status": "IN_QUEUE"}\n\n: keep-alive\n\n'
            b'data: {"id": "gen_1",\ndata: "status": "IN_PROGRESS"}\r\n\r\n'
            b'data: {"id": "gen_1", "status": "COMPLETED"}\n\n'
        )
        writer.write(EVENT_HEAD)
        for start in range(0, len(stream), 7):
            writer.write(chunk(stream[start : start + 7]))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with server(script) as url:
        creator = SseCreator(url, "up-key", timeout_s=5)
        upload = Upload("flux/dev", body_of(b'{"a":', b" 1}"), "application/json", None)
        answer = await creator.create(upload)
        assert (answer.status, answer.content_type) == (200, "application/json")
        assert answer.body == b'{"id": "gen_1", "status": "IN_QUEUE"}'
        assert (answer.generation_id, answer.generation_status) == ("gen_1", "IN_QUEUE")
        assert answer.stream is not None
        follower = Follower()
        answer.stream.listen(follower, "gen_1")
        async with asyncio.timeout(5):
            await follower.done.wait()
    assert follower.error is None
    assert follower.events == [
        ("gen_1", b'{"id": "gen_1",\n"status": "IN_PROGRESS"}'),
        ("gen_1", b'{"id": "gen_1", "status": "COMPLETED"}'),
    ]
    head = seen["head"].lower()
    assert head.startswith(b"post /api/v1/generation/sse/flux/dev http/1.1\r\n")
    for line in (
        b"authorization: bearer up-key",
        b"accept: text/event-stream",
        b"host: 127.0.0.1:",
    ):
        assert line in head
    assert seen["body"] == b'{"a": 1}'


async def test_a_refusal_is_read_whole_and_stops_the_upload() -> None:
    """An answer that is not a stream (402 while the body is still coming) is passed on
    with its type and Retry-After, the rest of the body unsent."""
    sent_more = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        refusal = b'{"error": "insufficient_credits"}'
        writer.write(
            b"HTTP/1.1 402 Payment Required\r\ncontent-type: application/json\r\n"
            b"retry-after: 9\r\ncontent-length: %d\r\n\r\n%b" % (len(refusal), refusal)
        )
        await writer.drain()
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readexactly(10_000_000)
            sent_more.set()

    async def slow_body() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 65536
            await asyncio.sleep(0.01)

    async with server(script) as url:
        answer = await SseCreator(url, None, timeout_s=5).create(
            Upload("flux/dev", slow_body(), "text/plain", 6553600)
        )
    assert (answer.status, answer.body) == (402, b'{"error": "insufficient_credits"}')
    assert (answer.content_type, answer.retry_after, answer.stream) == (
        "application/json",
        "9",
        None,
    )
    assert not sent_more.is_set()


@pytest.mark.parametrize(
    ("reply", "kind", "sent"),
    [
        (b"", "unreachable", True),  # closed without a word, after the whole request
        (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n", "invalid", True),
        (b"NOT HTTP AT ALL\r\n\r\n", "invalid", True),
        (None, "timeout", True),  # never answers
    ],
)
async def test_failures_say_whether_something_may_have_been_created(
    reply: bytes | None, kind: str, sent: bool
) -> None:
    """No answer, a stream that ends before its first event, bad HTTP and silence are
    failures of their kind, each saying the request went out whole."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if reply is None:
            await asyncio.sleep(5)
            return
        writer.write(reply)
        await writer.drain()

    async with server(script) as url:
        with pytest.raises(CreateFailed) as failed:
            await SseCreator(url, None, timeout_s=0.5).create(
                Upload("flux/dev", body_of(b"{}"), None, 2)
            )
    assert (failed.value.kind, failed.value.sent) == (kind, sent)


async def test_nothing_listening_is_unreachable_and_nothing_sent() -> None:
    """A refused connection: unreachable, and the request never went out."""
    listening = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    listening.close()
    await listening.wait_closed()
    with pytest.raises(CreateFailed) as failed:
        await SseCreator(f"http://127.0.0.1:{port}", None, timeout_s=1).create(
            Upload("flux/dev", body_of(b"{}"), None, 2)
        )
    assert (failed.value.kind, failed.value.sent) == ("unreachable", False)


async def test_a_first_event_that_is_final_closes_the_stream() -> None:
    """A generation final in its first event has nothing to follow: no stream is handed on."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(EVENT_HEAD + chunk(b'data: {"id": "g", "status": "FAILED"}\n\n'))
        await writer.drain()
        await asyncio.sleep(1)

    async with server(script) as url:
        answer = await SseCreator(url, None, timeout_s=2).create(
            Upload("flux/dev", body_of(), None, None)
        )
    assert (answer.generation_id, answer.generation_status, answer.stream) == ("g", "FAILED", None)
