"""Creating generations at the upstream: one POST of a client's body, streamed through, and
the upstream's answer read and classified; or, with `sse=True`, the streaming create, whose
first event is the answer and whose open stream is handed on to be followed.

Owns the create's network side, apart from polls (upstream.py): its own aiohttp session
(no connection limit, since a followed stream holds its connection), the relay's bearer key
in place of the client's, and only the headers the upstream needs (content type and length,
accept, user agent). The body is an async iterator of the client's chunks handed to aiohttp
as they arrive, so an upload of tens of MiB is never held; an error the iterator raises (the
client went away, the body is too large) aborts the upload and is raised again to the caller.

Timeouts: connecting has `timeout_s`, and so has the answer, counted from the moment the
whole body went out (a slow upload is the client's pace, not the upstream's). What went wrong
is a `CreateFailed` saying whether the request went out whole, that is whether the upstream
may have created a generation: the caller must never create again after one that did.

It must not touch the database, subscriptions or idempotency (proxy.py does).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Literal

import aiohttp
import orjson
from aiohttp.http_exceptions import HttpProcessingError

from relay import __version__
from relay.eventstream import EventStream
from relay.upstream import FINAL_STATUSES, normalize_status
from relay.upstream import _read_limited as read_limited

logger = logging.getLogger(__name__)

# A create's answer is one result object; anything larger is not an answer we can pass on.
ANSWER_MAX_BYTES = 2**20

FailureKind = Literal["unreachable", "timeout", "invalid"]


class CreateFailed(Exception):
    """The upstream gave no usable answer. `sent`: the request went out whole, so the
    upstream may have created the generation (an outcome nobody can know)."""

    def __init__(self, kind: FailureKind, detail: str, *, sent: bool) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.sent = sent


@dataclass(frozen=True)
class CreateAnswer:
    """The upstream's answer to a create: passed to the client verbatim."""

    status: int
    content_type: str | None
    retry_after: str | None
    body: bytes
    # From a 2xx JSON object: its string `id` and its status (normalised), else None.
    generation_id: str | None
    generation_status: str | None
    # The streaming create's stream, still open, when its first event was a generation
    # that is not final yet: whoever takes the answer must follow or close it.
    stream: EventStream | None = None

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300


def created_generation(status: int, body: bytes) -> tuple[str | None, str | None]:
    """(id, normalised status) of the generation a 2xx answer's body describes (pure)."""
    if not 200 <= status < 300:
        return None, None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(parsed, dict):
        return None, None
    gen_id = parsed.get("id")
    status_word = parsed.get("status")
    return (
        gen_id if isinstance(gen_id, str) and gen_id else None,
        normalize_status(status_word) if isinstance(status_word, str) else None,
    )


@dataclass
class _Upload:
    """Where an upload got to: whether the body went out whole, and what stopped it."""

    sent: bool = False
    body_error: Exception | None = None


class UpstreamCreator:
    """POSTs creates to `{base}/v1/generation/...`; safe to share between concurrent tasks."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout_s: float,
        connector: aiohttp.BaseConnector | None = None,
    ) -> None:
        self._headers = {"user-agent": f"relay/{__version__}"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._base = base_url.rstrip("/")
        self._timeout_s = timeout_s
        self._connector = connector
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        # Made on first use: an aiohttp session belongs to the running event loop.
        if self._session is None:
            connector = self._connector or aiohttp.TCPConnector(limit=0, ttl_dns_cache=60)
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers,
                # The answer's deadline is set once the body is out (see create()).
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self._timeout_s, sock_connect=self._timeout_s
                ),
                # The body is passed on as sent: ask for no compression.
                skip_auto_headers=("Accept-Encoding",),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def create(
        self,
        model_path: str,
        body: AsyncIterator[bytes],
        *,
        content_type: str | None,
        content_length: int | None,
        sse: bool = False,
    ) -> CreateAnswer:
        """POST `body` to `{base}/v1/generation/{model_path}` (`.../sse/{model_path}` with
        `sse`) and read the answer: the body, or the stream's first event.

        `model_path` is `provider/model...`, already checked to be safe in a URL path.
        Raises CreateFailed, or what `body` raised.
        """
        url = f"{self._base}/v1/generation/{'sse/' if sse else ''}{model_path}"
        headers = {"accept": "text/event-stream" if sse else "application/json"}
        skip = ["Content-Type"]
        if content_type is not None:
            headers["content-type"] = content_type
            skip = []
        if content_length is not None:
            headers["content-length"] = str(content_length)
        upload = _Upload()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(None) as deadline:

                async def chunks() -> AsyncIterator[bytes]:
                    try:
                        async for chunk in body:
                            yield chunk
                    except Exception as exc:
                        upload.body_error = exc
                        raise
                    upload.sent = True
                    deadline.reschedule(loop.time() + self._timeout_s)

                response = await self._get_session().post(
                    url,
                    data=chunks(),
                    headers=headers,
                    skip_auto_headers=skip,
                    allow_redirects=False,
                )
                # An answer before the body was all sent (an early refusal): the deadline
                # starts now.
                if not upload.sent:
                    deadline.reschedule(loop.time() + self._timeout_s)
                if not (sse and response.ok and _is_event_stream(response)):
                    try:
                        return _answer(response, await read_limited(response, ANSWER_MAX_BYTES))
                    finally:
                        response.release()
                answer = await _first_event(EventStream(response), response.status)
        except (TimeoutError, aiohttp.ClientError, OSError, HttpProcessingError) as exc:
            raise _failure(exc, upload) from None
        return answer


def _is_event_stream(response: aiohttp.ClientResponse) -> bool:
    return response.headers.get("content-type", "").lower().startswith("text/event-stream")


async def _first_event(stream: EventStream, status: int) -> CreateAnswer:
    """The streaming create's answer: its first event's object, as JSON. The stream stays
    open in the answer only while there is something to follow."""
    handed = False
    try:
        data = await stream.next_event()
        if data is None:
            raise CreateFailed(
                "invalid", "the upstream's stream ended before its first event", sent=True
            )
        gen_id, gen_status = created_generation(status, data)
        answer = CreateAnswer(status, "application/json", None, data, gen_id, gen_status)
        if gen_id is None or gen_status in FINAL_STATUSES:
            return answer
        handed = True
        return replace(answer, stream=stream)
    finally:
        if not handed:
            stream.close()


def _failure(exc: BaseException, upload: _Upload) -> Exception:
    """What to raise for an upload that ended in `exc`: the body's own error, if it was the
    cause, else a CreateFailed saying whether the request went out whole."""
    if upload.body_error is not None:
        return upload.body_error
    # aiohttp's connect timeouts are TimeoutErrors too: nothing was sent for those.
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return CreateFailed("timeout", "connecting to the upstream timed out", sent=False)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return CreateFailed(
            "unreachable", f"cannot connect to the upstream: {exc.os_error}", sent=False
        )
    if isinstance(exc, TimeoutError):
        return CreateFailed("timeout", "the upstream did not answer in time", sent=upload.sent)
    if isinstance(exc, HttpProcessingError):  # a stream's line over EVENT_MAX_BYTES
        return CreateFailed("invalid", "the upstream's stream sent a line too long", sent=True)
    return CreateFailed(
        "unreachable",
        f"the connection to the upstream failed: {type(exc).__name__}",
        sent=upload.sent,
    )


def _answer(response: aiohttp.ClientResponse, content: bytes | None) -> CreateAnswer:
    if content is None:
        raise CreateFailed(
            "invalid", f"the upstream's answer is over {ANSWER_MAX_BYTES // 1024} KiB", sent=True
        )
    gen_id, status = created_generation(response.status, content)
    return CreateAnswer(
        status=response.status,
        content_type=response.headers.get("content-type"),
        retry_after=response.headers.get("retry-after"),
        body=content,
        generation_id=gen_id,
        generation_status=status,
    )
