"""Callback-URL checks that need the network: DNS at subscription time, and the resolver
that vets every address a delivery connects to.

- `vet_callback_url()`: parse a callback URL and, unless private callbacks are allowed,
  refuse a host that is, or resolves to, a blocked address (addresses.is_blocked_ip);
- `VettingResolver`: the same check at delivery time, inside aiohttp's connector, on the
  very addresses the connection is then made to, so a DNS answer that changes between the
  check and the connect cannot reach a private network.

It must not read settings (callers pass `allow_private`) or log.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from ipaddress import IPv4Address

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

__all__ = ["VettingResolver", "vet_callback_url"]


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


_public_names = _PublicNames(ttl_s=30.0, max_entries=1024)


async def vet_callback_url(
    url: str, *, allow_private: bool, resolve_timeout_s: float = 2.0
) -> CallbackTarget:
    """Parse a callback URL and, unless `allow_private`, refuse blocked hosts.

    A host name is refused when any address it resolves to is blocked, or when it does
    not resolve. Raises CallbackURLError with a reason fit to show the client.
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
    if target.host in _public_names:
        return target
    for ip in await _resolve(target.host, target.port, resolve_timeout_s):
        if is_blocked_ip(ip):
            raise _private(target.host, ip)
    _public_names.add(target.host)
    return target


def _private(host: str, ip: IPAddress) -> CallbackURLError:
    return CallbackURLError(
        f"host {host} resolves to a private/loopback address ({ip}), which this relay does not call"
    )


async def _resolve(host: str, port: int, timeout_s: float) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise CallbackURLError(
            f"host name {host} does not resolve (no answer within {timeout_s:g} s)"
        ) from None
    except (OSError, ValueError):  # socket.gaierror, or UnicodeError for an odd name
        raise CallbackURLError(f"host name {host} does not resolve") from None
    if not infos:
        raise CallbackURLError(f"host name {host} does not resolve")
    # An answer that is not an address is treated as the most restrictive kind.
    return [address_or_unspecified(str(sockaddr[0])) for *_, sockaddr in infos]


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

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve `host`, keeping only addresses that are not blocked."""
        if self._inner is None:
            # ThreadedResolver binds the running loop, so it is made on first use.
            self._inner = ThreadedResolver()
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


def _refused(host: str) -> BlockedAddressError:
    return BlockedAddressError(f"refused: {host} resolves only to blocked addresses")
