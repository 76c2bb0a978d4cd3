"""Creating generations at the upstream: one POST of a client's body, streamed through, and
the upstream's answer read and classified. The streaming create (RELAY_UPSTREAM_SSE) is
ssecreate.py's, with the same interface (`Creator`) and the same answers and failures, which
are defined here.

Owns the plain create's network side, apart from polls (upstream.py): its own aiohttp session
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
from dataclasses import dataclass
from typing import Literal, Protocol

import aiohttp
import orjson

from relay import __version__
from relay.statuses import normalize_status
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


class StreamListener(Protocol):
    """Who follows an open stream: told each event's data, and its end (`error` None when the
    upstream ended it)."""

    def event(self, key: str, data: bytes) -> None: ...

    def ended(self, key: str, error: BaseException | None) -> None: ...


class OpenStream(Protocol):
    """A streaming create's stream, still open after its first event."""

    def listen(self, listener: StreamListener, key: str) -> None:
        """Deliver every event to `listener` under `key` (those already come, at once)."""

    def close(self) -> None:
        """Drop the connection; the listener, if any, is not told."""


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
    stream: OpenStream | None = None

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
class _Progress:
    """Where an upload got to: whether the body went out whole, and what stopped it."""

    sent: bool = False
    body_error: Exception | None = None


@dataclass(frozen=True)
class Upload:
    """A create to send: `model_path` is `provider/model...`, already checked to be safe in
    a URL path; `body` the client's chunks as they arrive (raising what stops them)."""

    model_path: str
    body: AsyncIterator[bytes]
    content_type: str | None
    content_length: int | None


class Creator(Protocol):
    """What creates at the upstream: UpstreamCreator, or ssecreate.SseCreator."""

    async def create(self, upload: Upload) -> CreateAnswer: ...

    async def aclose(self) -> None: ...


def upstream_headers(api_key: str | None) -> dict[str, str]:
    """The headers every create carries: the relay's user agent and upstream key."""
    headers = {"user-agent": f"relay/{__version__}"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


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
        self._headers = upstream_headers(api_key)
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

    async def create(self, upload: Upload) -> CreateAnswer:
        """POST the upload to `{base}/v1/generation/{model_path}` and read the answer.
        Raises CreateFailed, or what the body raised."""
        url = f"{self._base}/v1/generation/{upload.model_path}"
        body, content_type, content_length = upload.body, upload.content_type, upload.content_length
        headers = {"accept": "application/json"}
        skip = ["Content-Type"]
        if content_type is not None:
            headers["content-type"] = content_type
            skip = []
        if content_length is not None:
            headers["content-length"] = str(content_length)
        progress = _Progress()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(None) as deadline:

                async def chunks() -> AsyncIterator[bytes]:
                    try:
                        async for chunk in body:
                            yield chunk
                    except Exception as exc:
                        progress.body_error = exc
                        raise
                    progress.sent = True
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
                if not progress.sent:
                    deadline.reschedule(loop.time() + self._timeout_s)
                try:
                    return _answer(response, await read_limited(response, ANSWER_MAX_BYTES))
                finally:
                    response.release()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _failure(exc, progress) from None


def _failure(exc: BaseException, progress: _Progress) -> Exception:
    """What to raise for an upload that ended in `exc`: the body's own error, if it was the
    cause, else a CreateFailed saying whether the request went out whole."""
    if progress.body_error is not None:
        return progress.body_error
    # aiohttp's connect timeouts are TimeoutErrors too: nothing was sent for those.
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return CreateFailed("timeout", "connecting to the upstream timed out", sent=False)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return CreateFailed(
            "unreachable", f"cannot connect to the upstream: {exc.os_error}", sent=False
        )
    if isinstance(exc, TimeoutError):
        return CreateFailed("timeout", "the upstream did not answer in time", sent=progress.sent)
    return CreateFailed(
        "unreachable",
        f"the connection to the upstream failed: {type(exc).__name__}",
        sent=progress.sent,
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
