"""The upstream client: one poll of `GET {base}/v1/generation/{id}`, and the running list
`GET {base}/v1/generations/running?limit=N` that batch sweeps read, each answer classified.

Owns the upstream's quirks so the poller need not: statuses are read in any spelling the
upstream has used (statuses.normalize_status). A 200 body must be a JSON object
with a string `status`, and is kept as the exact text upstream sent. Everything that goes
wrong becomes a `PollResult` kind, never an exception.

The client is aiohttp, chosen by measurement: with httpx the poller spent most of its CPU in
httpx's connection pool (docs/benchmarks.md). The connector is injectable (`connector=`), so
tests can swap the network without patching; the default pool is sized to the poller's
concurrency.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple
from urllib.parse import quote

import aiohttp
import orjson
import yarl

from relay import __version__
from relay.retry import parse_retry_after
from relay.schemas import is_generation_id
from relay.statuses import normalize_status

logger = logging.getLogger(__name__)

# A final result is a small JSON object with URLs: refuse a runaway body (up to
# RELAY_POLL_CONCURRENCY are read at once). RELAY_UPSTREAM_MAX_BODY changes it.
MAX_BODY_BYTES = 2**20

PollKind = Literal["ok", "not_found", "unauthorized", "rate_limited", "error"]
ListKind = Literal["ok", "unsupported", "unauthorized", "rate_limited", "error"]
LIST_MAX_BODY_BYTES = 2**20  # 100 items of {id, status, usage, input}: far below this
# The answers of an upstream that has no running list: sweeps stop for a while.
_UNSUPPORTED = frozenset({404, 405, 501})


@dataclass(frozen=True)
class PollResult:
    kind: PollKind
    status: str | None = None  # normalised, when kind == "ok"
    body: str | None = None  # the body exactly as sent, when kind == "ok"
    http_status: int | None = None
    retry_after_s: float | None = None
    error: str | None = None


class Listed(NamedTuple):
    generation_id: str
    status: str  # normalised


@dataclass(frozen=True)
class RunningList:
    """One answer of the running list. `complete`: fewer items than asked for, so a watched
    generation missing from it is not running (in this workspace); otherwise the list may
    have been cut short and proves only the presence of what it holds."""

    kind: ListKind
    items: tuple[Listed, ...] = ()
    complete: bool = False
    http_status: int | None = None
    retry_after_s: float | None = None
    error: str | None = None


class UpstreamClient:
    """Polls one generation at a time; safe to share between concurrent tasks."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout_s: float,
        max_connections: int = 64,
        max_body_bytes: int = MAX_BODY_BYTES,
        connector: aiohttp.BaseConnector | None = None,
    ) -> None:
        self._headers = {"accept": "application/json", "user-agent": f"relay/{__version__}"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._base = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_connections = max_connections
        self._max_body_bytes = max_body_bytes
        self._connector = connector
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        # Made on first use: an aiohttp session belongs to the running event loop.
        if self._session is None:
            connector = self._connector or aiohttp.TCPConnector(
                limit=self._max_connections, ttl_dns_cache=60
            )
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self._headers, timeout=self._timeout
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def generation_url(self, generation_id: str) -> yarl.URL:
        """`{base}/v1/generation/{id}` with the id as one opaque path segment."""
        return generation_url(self._base, generation_id)

    async def poll(self, generation_id: str) -> PollResult:
        url = self.generation_url(generation_id)
        try:
            async with self._get_session().get(url, allow_redirects=False) as response:
                content = await _read_limited(response, self._max_body_bytes)
                if content is None:
                    return PollResult(
                        kind="error",
                        http_status=response.status,
                        error=f"upstream body over {self._max_body_bytes} bytes",
                    )
                return classify(response.status, content, response.headers.get("retry-after"))
        except TimeoutError:
            return PollResult(kind="error", error="upstream timed out")
        except (aiohttp.ClientError, OSError) as exc:
            return PollResult(kind="error", error=f"upstream unreachable: {type(exc).__name__}")

    async def list_running(self, limit: int) -> RunningList:
        url = f"{self._base}/v1/generations/running"
        try:
            async with self._get_session().get(
                url, params={"limit": str(limit)}, allow_redirects=False
            ) as response:
                content = await _read_limited(response, LIST_MAX_BODY_BYTES)
                if content is None:
                    return RunningList(kind="error", error="running list body too large")
                return classify_list(
                    response.status, content, response.headers.get("retry-after"), limit
                )
        except TimeoutError:
            return RunningList(kind="error", error="upstream timed out")
        except (aiohttp.ClientError, OSError) as exc:
            return RunningList(kind="error", error=f"upstream unreachable: {type(exc).__name__}")


def generation_url(base: str, generation_id: str) -> yarl.URL:
    """The poll URL of a generation, whatever characters its id holds.

    Every character outside RFC 3986's unreserved set is percent-encoded, and "." too, so no
    id can be a dot segment ("." or "..") that a URL library or a server would resolve into
    another path; the URL is handed to aiohttp as encoded, so it is sent exactly so.
    """
    segment = quote(generation_id, safe="").replace(".", "%2E")
    return yarl.URL(f"{base}/v1/generation/{segment}", encoded=True)


async def _read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def classify(http_status: int, content: bytes, retry_after: str | None) -> PollResult:
    """Turn one upstream answer into a PollResult (pure)."""
    if http_status == 200:
        try:
            body = orjson.loads(content)
        except orjson.JSONDecodeError:
            return PollResult(kind="error", http_status=200, error="upstream sent malformed JSON")
        if not isinstance(body, dict) or not isinstance(body.get("status"), str):
            return PollResult(
                kind="error", http_status=200, error="upstream body has no string status"
            )
        status = normalize_status(body["status"])
        return PollResult(
            kind="ok", status=status, body=content.decode("utf-8", "replace"), http_status=200
        )
    error = f"upstream answered HTTP {http_status}{_error_code(content)}"
    if http_status == 404:
        return PollResult(kind="not_found", http_status=404, error=error)
    if http_status in (401, 403):
        return PollResult(kind="unauthorized", http_status=http_status, error=error)
    if http_status == 429:
        return PollResult(
            kind="rate_limited",
            http_status=429,
            retry_after_s=parse_retry_after(retry_after, time.time()),
            error=error,
        )
    retry_after_s = parse_retry_after(retry_after, time.time()) if http_status == 503 else None
    return PollResult(
        kind="error", http_status=http_status, retry_after_s=retry_after_s, error=error
    )


def _error_code(content: bytes) -> str:
    """The machine code of an upstream error body, parsed defensively, for logs and last_error."""
    try:
        body = orjson.loads(content[:4096])
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(body, dict):
        return ""
    code = body.get("code") or body.get("error")
    return f" ({str(code)[:80]})" if code else ""


def classify_list(
    http_status: int, content: bytes, retry_after: str | None, limit: int
) -> RunningList:
    """Turn one running-list answer into a RunningList (pure). Items that are not objects with
    a valid id and a string status are skipped, but still count toward completeness."""
    if http_status != 200:
        error = f"upstream answered HTTP {http_status}{_error_code(content)}"
        kind: ListKind = "error"
        if http_status in _UNSUPPORTED:
            kind = "unsupported"
        elif http_status in (401, 403):
            kind = "unauthorized"
        elif http_status == 429:
            kind = "rate_limited"
        retry_after_s = (
            parse_retry_after(retry_after, time.time()) if http_status in (429, 503) else None
        )
        return RunningList(
            kind=kind, http_status=http_status, retry_after_s=retry_after_s, error=error
        )
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return RunningList(kind="error", http_status=200, error="running list is not JSON")
    if isinstance(body, dict):  # tolerate an envelope around the documented array
        body = body.get("data", body.get("items"))
    if not isinstance(body, list):
        return RunningList(kind="error", http_status=200, error="running list is not an array")
    items = []
    for item in body:
        if not isinstance(item, dict):
            continue
        gen_id, status = item.get("id"), item.get("status")
        if isinstance(gen_id, str) and is_generation_id(gen_id) and isinstance(status, str):
            items.append(Listed(gen_id, normalize_status(status)))
    return RunningList(kind="ok", items=tuple(items), complete=len(body) < limit, http_status=200)
