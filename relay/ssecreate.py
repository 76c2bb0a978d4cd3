"""The streaming create (RELAY_UPSTREAM_SSE): `POST {base}/v1/generation/sse/{model...}` over
a connection of its own, written for memory, since a relay follows thousands of them.

One HTTP/1.1 exchange per stream: the request head, the client's body streamed with
backpressure (with its length, or chunked), and the answer parsed by httptools' C parser
into SSE events (eventstream.EventParser). The first event is the client's answer; later ones
go to whoever listens (streams.py), kept in order until someone does. While a stream is
followed it costs its transport, one slotted protocol object and the C parser: no task, no
HTTP library's buffers. An answer that is not an event stream (a refusal) is read whole, up
to ANSWER_MAX_BYTES, and passed on like the plain create's.

Answers and failures are creator.py's (`CreateAnswer`, `CreateFailed`): the same timeouts
(connecting, and the answer counted from the end of the upload) and the same question, may
the upstream have created something. It must not touch the database nor know what an
event means.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import replace
from typing import cast
from urllib.parse import urlsplit

import httptools

from relay.creator import (
    ANSWER_MAX_BYTES,
    CreateAnswer,
    CreateFailed,
    StreamListener,
    Upload,
    created_generation,
    upstream_headers,
)
from relay.eventstream import EVENT_MAX_BYTES, EventParser
from relay.statuses import FINAL_STATUSES


class _Invalid(Exception):
    """The upstream's answer cannot be read (bad HTTP, a line or body too long)."""


class Exchange(asyncio.Protocol):
    """One streaming create's connection: the request goes out through `write`, the answer
    comes in through httptools' callbacks. After the first event it is the OpenStream."""

    __slots__ = (
        "_answer",
        "_body",
        "_drained",
        "_events",
        "_head",
        "_key",
        "_line",
        "_listener",
        "_parser",
        "_pending",
        "_stream",
        "content_type",
        "retry_after",
        "status",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.content_type: str | None = None
        self.retry_after: str | None = None
        self._stream = False  # the answer is an event stream
        # Until the answer is in: its head, then the first event (or the whole body).
        self._head: asyncio.Future[None] | None = loop.create_future()
        self._answer: asyncio.Future[bytes | None] | None = loop.create_future()
        self._drained: asyncio.Future[None] | None = None  # set while writing is paused
        self._body = b""  # a body that is not a stream, or a stream's unfinished line
        self._line = b""
        self._events: EventParser | None = None
        self._pending: list[bytes] | None = None  # events before anyone listened
        self._listener: StreamListener | None = None
        self._key = ""

    # --- The request ------------------------------------------------------------------------

    @property
    def answered(self) -> bool:
        """The answer's head has come (possibly before the body was all sent)."""
        return self._head is None or self._head.done()

    async def write(self, data: bytes) -> None:
        """Send `data`, waiting while the peer is slow to read it."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the connection to the upstream closed")
        transport.write(data)
        if self._drained is not None:
            await self._drained

    async def answer(self) -> bytes | None:
        """The first event's data (or, for an answer that is not a stream, its whole body);
        None when a stream ended before its first event."""
        head, answer = self._head, self._answer
        assert head is not None and answer is not None
        try:
            await head
            return await answer
        finally:
            self._head = self._answer = None  # not needed any more: a stream lives long

    @property
    def is_stream(self) -> bool:
        return self._stream

    # --- The open stream --------------------------------------------------------------------

    def listen(self, listener: StreamListener, key: str) -> None:
        self._listener, self._key = listener, key
        pending, self._pending = self._pending, None
        for data in pending or ():
            listener.event(key, data)
        if self.transport is None:  # it ended before anyone listened
            listener.ended(key, None)

    def close(self) -> None:
        self._listener = None
        if self.transport is not None:
            self.transport.close()

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # A callback's own error arrives as the parser's, with the cause as its context.
            cause = exc.__context__
            self._fail(cause if isinstance(cause, _Invalid) else _Invalid(f"bad HTTP: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionResetError("connection lost"))
        if self._answer is not None and not self._answer.done() and self._stream:
            self._answer.set_result(None)  # the stream ended before its first event
        self._fail(exc or ConnectionResetError("the upstream closed the connection"))
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.ended(self._key, exc)

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    # --- httptools' callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"content-type":
            self.content_type = value.decode("latin-1")
        elif lowered == b"retry-after":
            self.retry_after = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if self.status < 200:  # an interim answer (100 Continue): the real one follows
            self.content_type = self.retry_after = None
            return
        media = (self.content_type or "").lower()
        self._stream = 200 <= self.status < 300 and media.startswith("text/event-stream")
        if self._stream:
            self._events, self._pending = EventParser(), []
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if not self._stream:
            self._body += body
            if len(self._body) > ANSWER_MAX_BYTES:
                raise _Invalid(f"the answer is over {ANSWER_MAX_BYTES // 1024} KiB")
            return
        *lines, self._line = (self._line + body).split(b"\n")
        if len(self._line) > EVENT_MAX_BYTES:
            raise _Invalid(f"an event is over {EVENT_MAX_BYTES // 1024} KiB")
        assert self._events is not None
        for line in lines:
            data = self._events.feed(line)
            if data is not None:
                self._deliver(data)

    def on_message_complete(self) -> None:
        if self.status < 200:
            return
        if not self._stream:
            if self._answer is not None and not self._answer.done():
                self._answer.set_result(self._body)
            return
        if self.transport is not None:  # the stream ended: the connection goes with it
            self.transport.close()

    # ---------------------------------------------------------------------------------------

    def _deliver(self, data: bytes) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(data)
            return
        if self._listener is not None:
            self._listener.event(self._key, data)
        elif self._pending is not None:
            self._pending.append(data)

    def _fail(self, exc: BaseException) -> None:
        for future in (self._head, self._answer):
            if future is not None and not future.done():
                future.set_exception(exc)
        if self.transport is not None and isinstance(exc, _Invalid):
            self.transport.close()


class SseCreator:
    """Creates through the upstream's streaming endpoint; safe to share between tasks."""

    def __init__(self, base_url: str, api_key: str | None, *, timeout_s: float) -> None:
        parts = urlsplit(base_url.rstrip("/"))
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        host = f"[{self._host}]" if ":" in self._host else self._host
        default_port = self._port == (443 if self._tls else 80)
        self._authority = host if default_port else f"{host}:{self._port}"
        self._prefix = f"{parts.path}/v1/generation/sse/"
        self._headers = upstream_headers(api_key)
        self._timeout_s = timeout_s

    async def aclose(self) -> None:
        """Nothing pooled: every stream has its own connection, closed by its follower."""

    async def create(self, upload: Upload) -> CreateAnswer:
        """POST the upload to `{base}/v1/generation/sse/{model_path}`; the answer is the
        stream's first event, with the stream still open while its generation is not final."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout_s):
                _, exchange = await loop.create_connection(
                    lambda: Exchange(loop),
                    self._host,
                    self._port,
                    ssl=self._tls,
                    server_hostname=self._host if self._tls else None,
                )
        except TimeoutError:
            raise CreateFailed(
                "timeout", "connecting to the upstream timed out", sent=False
            ) from None
        except OSError as exc:
            raise CreateFailed(
                "unreachable", f"cannot connect to the upstream: {exc}", sent=False
            ) from None
        handed = False
        try:
            answer = await self._exchange(exchange, upload)
            handed = answer.stream is not None
            return answer
        finally:
            if not handed:
                exchange.close()

    async def _exchange(self, exchange: Exchange, upload: Upload) -> CreateAnswer:
        sent = False
        try:
            await exchange.write(self._head(upload))
            chunked = upload.content_length is None
            async for chunk in upload.body:
                if exchange.answered:  # an early answer (a refusal): stop sending
                    break
                await exchange.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            else:
                if chunked:
                    await exchange.write(b"0\r\n\r\n")
                sent = True
            async with asyncio.timeout(self._timeout_s):
                first = await exchange.answer()
        except TimeoutError:
            raise CreateFailed(
                "timeout", "the upstream did not answer in time", sent=sent
            ) from None
        except _Invalid as exc:
            raise CreateFailed("invalid", str(exc), sent=True) from None
        except OSError as exc:
            raise CreateFailed(
                "unreachable",
                f"the connection to the upstream failed: {type(exc).__name__}",
                sent=sent,
            ) from None
        if not exchange.is_stream:
            assert first is not None
            gen_id, status = created_generation(exchange.status, first)
            return CreateAnswer(
                exchange.status, exchange.content_type, exchange.retry_after, first, gen_id, status
            )
        if first is None:
            raise CreateFailed(
                "invalid", "the upstream's stream ended before its first event", sent=True
            )
        gen_id, status = created_generation(exchange.status, first)
        answer = CreateAnswer(exchange.status, "application/json", None, first, gen_id, status)
        if gen_id is None or status in FINAL_STATUSES:
            return answer
        return replace(answer, stream=exchange)

    def _head(self, upload: Upload) -> bytes:
        lines = [
            f"POST {self._prefix}{upload.model_path} HTTP/1.1",
            f"host: {self._authority}",
            "accept: text/event-stream",
            *(f"{name}: {value}" for name, value in self._headers.items()),
        ]
        if upload.content_type is not None:
            lines.append(f"content-type: {upload.content_type}")
        if upload.content_length is None:
            lines.append("transfer-encoding: chunked")
        else:
            lines.append(f"content-length: {upload.content_length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
