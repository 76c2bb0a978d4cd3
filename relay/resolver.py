"""Callback-URL checks that need the network: DNS at subscription time, and the resolver
that vets every address a delivery connects to. The two never share a thread pool, so
lookups that hang at subscription time cannot hold up deliveries.

- `IntakeResolver.vet()`: parse a callback URL and, unless private callbacks are allowed,
  refuse a host that is, or resolves to, a blocked address (addresses.is_blocked_ip). Its
  DNS is c-ares (aiodns) in the event loop: a lookup that never gets an answer holds no
  thread, at most `max_concurrent` lookups are in flight, and each has `timeout_s`. aiodns
  because it answers without threads and can be pointed at another name server (tests
  point it at one that never answers).
- `VettingResolver`: the same check at delivery time, inside aiohttp's connector, on the
  very addresses the connection is then made to, so a DNS answer that changes between the
  check and the connect cannot reach a private network. Its lookups are the system's
  getaddrinfo on a small thread pool of its own, not the event loop's default executor.

It must not read settings (callers pass `allow_private`) or log.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address
from typing import Any, cast

import aiodns
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from relay.addresses import (
    BlockedAddressError,
    CallbackTarget,
    CallbackURLError,
    IPAddress,
    address_or_unspecified,
    is_blocked_ip,
    is_localhost_name,
    literal_ip,
    parse_callback_url,
)

__all__ = ["IntakeResolver", "VettingResolver"]

INTAKE_TIMEOUT_S = 2.0
INTAKE_MAX_CONCURRENT = 32
DELIVERY_DNS_THREADS = 8

# A lookup: the addresses (as text) a host name resolves to; OSError if it does not resolve.
Lookup = Callable[[str, int], Awaitable[Sequence[str]]]


class _PublicNames:
    """Host names recently found to resolve only to public addresses.

    Subscriptions arrive in bursts for the same few hosts; this keeps a burst to one lookup.
    Only an ingest-time courtesy: every delivery checks the addresses it connects to.
    """

    def __init__(
        self, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._expires_at: dict[str, float] = {}

    def __contains__(self, host: str) -> bool:
        expires_at = self._expires_at.get(host)
        if expires_at is None:
            return False
        if expires_at <= self._clock():
            self._expires_at.pop(host, None)
            return False
        return True

    def __len__(self) -> int:
        return len(self._expires_at)

    def add(self, host: str) -> None:
        now = self._clock()
        self._expires_at.pop(host, None)
        if len(self._expires_at) >= self._max_entries:
            for name, expires_at in list(self._expires_at.items()):
                if expires_at <= now:
                    del self._expires_at[name]
            while len(self._expires_at) >= self._max_entries:
                # Dicts keep insertion order, so the first entry is the oldest.
                del self._expires_at[next(iter(self._expires_at))]
        self._expires_at[host] = now + self._ttl_s

    def clear(self) -> None:
        self._expires_at.clear()


class IntakeResolver:
    """The subscription-time address check, with DNS of its own (see the module docstring).

    `nameservers`/`port` point it at other name servers than the system's; `lookup`
    replaces DNS altogether (tests). Make it inside the event loop that will use it.
    """

    def __init__(
        self,
        *,
        timeout_s: float = INTAKE_TIMEOUT_S,
        max_concurrent: int = INTAKE_MAX_CONCURRENT,
        nameservers: Sequence[str] | None = None,
        port: int | None = None,
        lookup: Lookup | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(max_concurrent)
        self._public_names = _PublicNames(ttl_s=30.0, max_entries=1024)
        self._nameservers = nameservers
        self._port = port
        self._dns: aiodns.DNSResolver | None = None
        self._lookup = lookup or self._c_ares

    async def vet(self, url: str, *, allow_private: bool) -> CallbackTarget:
        """Parse a callback URL and, unless `allow_private`, refuse blocked hosts.

        A host name is refused when any address it resolves to is blocked, or when it
        does not resolve in time. Raises CallbackURLError with a reason fit to show the
        client.
        """
        target = parse_callback_url(url)
        if allow_private:
            return target
        if target.ip is not None:
            if is_blocked_ip(target.ip):
                raise _private(target.host, target.ip)
            return target
        if is_localhost_name(target.host):
            raise _private(target.host, IPv4Address("127.0.0.1"))
        if target.host in self._public_names:
            return target
        for ip in await self._resolve(target.host, target.port):
            if is_blocked_ip(ip):
                raise _private(target.host, ip)
        self._public_names.add(target.host)
        return target

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        try:
            # Waiting for a free slot counts against the same deadline as the lookup.
            async with asyncio.timeout(self.timeout_s), self._slots:
                addresses = await self._lookup(host, port)
        except TimeoutError:
            raise CallbackURLError(
                f"host name {host} does not resolve (no answer within {self.timeout_s:g} s)"
            ) from None
        except (OSError, ValueError, aiodns.error.DNSError):  # ValueError: an odd name
            raise CallbackURLError(f"host name {host} does not resolve") from None
        if not addresses:
            raise CallbackURLError(f"host name {host} does not resolve")
        # An answer that is not an address is treated as the most restrictive kind.
        return [address_or_unspecified(text) for text in addresses]

    async def _c_ares(self, host: str, port: int) -> list[str]:
        if self._dns is None:
            options: dict[str, Any] = {"timeout": self.timeout_s, "tries": 1}
            if self._port is not None:
                options.update(udp_port=self._port, tcp_port=self._port)
            self._dns = aiodns.DNSResolver(nameservers=self._nameservers, **options)
        result = await self._dns.getaddrinfo(host, port=port, type=socket.SOCK_STREAM)
        return [_text(node.addr[0]) for node in result.nodes]

    async def close(self) -> None:
        if self._dns is not None:
            await self._dns.close()
            self._dns = None


def _text(address: bytes | str) -> str:
    return address.decode("ascii", "replace") if isinstance(address, bytes) else address


def _private(host: str, ip: IPAddress) -> CallbackURLError:
    return CallbackURLError(
        f"host {host} resolves to a private/loopback address ({ip}), which this relay does not call"
    )


class _OwnPool:
    """What aiohttp's ThreadedResolver asks of the event loop (getaddrinfo, getnameinfo),
    run on a thread pool of its own rather than the loop's default executor."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int) -> None:
        self._loop = loop
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="relay-delivery-dns")

    async def getaddrinfo(self, *args: Any, **kwargs: Any) -> Any:
        call = functools.partial(socket.getaddrinfo, *args, **kwargs)
        return await self._loop.run_in_executor(self._pool, call)

    async def getnameinfo(self, sockaddr: Any, flags: int = 0) -> Any:
        return await self._loop.run_in_executor(self._pool, socket.getnameinfo, sockaddr, flags)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class VettingResolver(AbstractResolver):
    """An aiohttp resolver that drops blocked addresses, so connections reach only the rest.

    Plug it into `aiohttp.TCPConnector(resolver=...)`: aiohttp connects to the addresses
    returned here (and still verifies TLS against the host name). aiohttp never asks a
    resolver about address literals, so call `check_literal(url.raw_host)` before each
    request as well. With `allow_private=True` it passes everything through.
    """

    def __init__(
        self, *, allow_private: bool = False, inner: AbstractResolver | None = None
    ) -> None:
        self._allow_private = allow_private
        self._inner = inner
        self._owns_inner = inner is None
        self._pool: _OwnPool | None = None

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve `host`, keeping only addresses that are not blocked."""
        if self._inner is None:
            # ThreadedResolver binds the running loop, so it is made on first use; its
            # lookups go to this resolver's own threads.
            self._pool = _OwnPool(asyncio.get_running_loop(), DELIVERY_DNS_THREADS)
            self._inner = ThreadedResolver(cast(asyncio.AbstractEventLoop, self._pool))
        if self._allow_private:
            return await self._inner.resolve(host, port, family)
        if is_localhost_name(host):
            raise _refused(host)
        allowed = [
            result
            for result in await self._inner.resolve(host, port, family)
            if not is_blocked_ip(address_or_unspecified(result["host"]))
        ]
        if not allowed:
            raise _refused(host)
        return allowed

    def check_literal(self, host: str) -> None:
        """Raise BlockedAddressError if `host` is a blocked address literal.

        Accepts a host as yarl gives it (`URL.raw_host`) or with IPv6 brackets; host names
        pass, since `resolve()` checks them. A malformed literal is refused.
        """
        if self._allow_private:
            return
        bare = host.removeprefix("[").removesuffix("]")
        # A zone identifier only ever scopes a link-local address, blocked anyway.
        bare = bare.partition("%")[0]
        try:
            ip = literal_ip(bare)
        except ValueError:
            raise BlockedAddressError(f"refused: {host} is not a valid address") from None
        if ip is not None and is_blocked_ip(ip):
            raise BlockedAddressError(f"refused: {host} is a blocked address")

    async def close(self) -> None:
        """Close the wrapped resolver if this resolver made it."""
        if self._owns_inner and self._inner is not None:
            await self._inner.close()
        if self._pool is not None:
            self._pool.shutdown()


def _refused(host: str) -> BlockedAddressError:
    return BlockedAddressError(f"refused: {host} resolves only to blocked addresses")
