"""Sending one callback: the HTTP POST and nothing else.

`CallbackSender` is the seam between the deliverer's scheduling and the network: tests hand
`create_app(..., sender=...)` a scripted sender, production uses `AiohttpSender`. The sender
never follows a redirect, reads at most EXCERPT_BYTES of an answer, and connects only to
vetted addresses (resolver.py's `VettingResolver`; literal addresses are vetted here, since
aiohttp does not ask a resolver about them).

The HTTP client is aiohttp, chosen by measurement (docs/benchmarks.md): stock httpx slows to a
few hundred POSTs/s with many in flight. This module must not decide anything about retries,
signing or scheduling (deliverer.py and retry.py do), and must not touch the database.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import yarl

from relay.addresses import BlockedAddressError
from relay.resolver import VettingResolver

EXCERPT_BYTES = 2048


@dataclass(frozen=True)
class SendResult:
    """What one POST came to: a status code, or an error when no answer came."""

    status_code: int | None
    error: str | None = None
    excerpt: str | None = None
    retry_after: str | None = None


class CallbackSender(Protocol):
    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float
    ) -> SendResult: ...

    async def aclose(self) -> None: ...


class AiohttpSender:
    """POSTs with aiohttp; never follows redirects, reads at most EXCERPT_BYTES of an answer."""

    def __init__(self, *, allow_private: bool, limit: int, limit_per_host: int) -> None:
        self._limit = limit
        self._limit_per_host = limit_per_host
        self._resolver = VettingResolver(allow_private=allow_private)
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._limit,
                limit_per_host=self._limit_per_host,
                resolver=self._resolver,
                ttl_dns_cache=10,
            )
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        return self._session

    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float
    ) -> SendResult:
        try:
            # One parse for the check and the connection: the host as aiohttp connects to it
            # (another parser read "127。0。0。1" as a name; yarl reads 127.0.0.1). aiohttp
            # does not ask the resolver about literal IPs: vet those here.
            target = yarl.URL(url)
            self._resolver.check_literal(target.raw_host or "")
        except BlockedAddressError as exc:
            return SendResult(status_code=None, error=str(exc))
        except ValueError as exc:
            return SendResult(status_code=None, error=f"invalid callback URL: {exc}"[:300])
        try:
            async with self._get_session().post(
                target,
                data=body,
                headers=dict(headers),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as response:
                excerpt = await response.content.read(EXCERPT_BYTES)
                return SendResult(
                    status_code=response.status,
                    excerpt=excerpt.decode("utf-8", "replace") or None,
                    retry_after=response.headers.get("retry-after"),
                )
        except TimeoutError:
            return SendResult(status_code=None, error=f"timed out after {timeout_s:g} s")
        except aiohttp.ClientConnectorError as exc:
            return SendResult(status_code=None, error=f"connection failed: {exc.os_error or exc}")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return SendResult(status_code=None, error=f"{type(exc).__name__}: {exc}"[:300])

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
