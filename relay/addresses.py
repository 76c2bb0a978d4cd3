"""The private-address rule for callback URLs: which hosts the relay may call (pure).

This module owns three things:

- `is_blocked_ip()`: the one definition of a blocked address (loopback, private, CGNAT,
  link-local, unique-local, site-local, multicast, unspecified, broadcast, reserved,
  documentation and benchmarking ranges, and IPv6 forms that carry such an IPv4 address);
- `parse_callback_url()`: the syntax of a callback URL and where it points;
- `receiver_host()`: which receiver a callback URL points at, the unit of per-host limits.

The checks that need the network (DNS at subscription time, the connector's resolver at
delivery time) live in resolver.py. This module must not read settings, do I/O, or log: a
refusal is an exception with a reason fit to show the client.

Errors::

    CallbackURLError(ValueError)   the URL is malformed or its host is refused (API: 422)
    BlockedAddressError(OSError)   a delivery-time refusal; aiohttp wraps it in
                                   ClientConnectorDNSError, whose .os_error is this
"""

from __future__ import annotations

import errno
import functools
import re
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import TypeAlias
from urllib.parse import urlsplit

import yarl

__all__ = [
    "MAX_URL_CHARS",
    "BlockedAddressError",
    "CallbackTarget",
    "CallbackURLError",
    "IPAddress",
    "address_or_unspecified",
    "is_blocked_ip",
    "is_localhost_name",
    "literal_ip",
    "parse_callback_url",
    "receiver_host",
]

IPAddress: TypeAlias = IPv4Address | IPv6Address

MAX_URL_CHARS = 2048

_DEFAULT_PORTS = {"http": 80, "https": 443}

# Listed explicitly, not left to `ipaddress` alone: what `is_global` covers has changed
# between Python patch releases, and this list is the rule the contract promises.
_BLOCKED_V4 = tuple(
    IPv4Network(net)
    for net in (
        "0.0.0.0/8",  # "this network", including the unspecified 0.0.0.0
        "10.0.0.0/8",  # private
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, home of cloud metadata services
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # deprecated 6to4 relay anycast
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, including broadcast 255.255.255.255
    )
)
_BLOCKED_V6 = tuple(
    IPv6Network(net)
    for net in (
        "::/96",  # unspecified, loopback and deprecated IPv4-compatible addresses
        "::ffff:0:0:0/96",  # IPv4-translated (SIIT)
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments, including Teredo 2001::/32
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
        "fc00::/7",  # unique-local
        "fe80::/10",  # link-local
        "fec0::/10",  # deprecated site-local
        "ff00::/8",  # multicast
    )
)
# DNS64 answers on IPv6-only networks carry the real IPv4 address under this prefix.
_NAT64 = IPv6Network("64:ff9b::/96")


def receiver_host(url: str) -> str:
    """The receiver a callback URL points at, "host:port", the unit of per-host limits: the
    host as aiohttp's connection pool keys it (yarl's raw_host: IDNA-encoded, lowercased,
    IPv6 compressed), so one pool is never counted as two hosts."""
    try:
        parsed = yarl.URL(url)
        return f"{parsed.raw_host or ''}:{parsed.port or 0}"
    except ValueError:  # such a URL was refused at subscription time anyway
        return f"{urlsplit(url).hostname or ''}:0"


@functools.lru_cache(maxsize=4096)  # pure, and dozens of network tests per address
def is_blocked_ip(ip: IPAddress) -> bool:
    """Return True when the relay must not call `ip` unless private callbacks are allowed.

    IPv4-mapped, 6to4 and NAT64 addresses lead to the IPv4 address inside them, so that
    address decides; other IPv6 forms that embed IPv4 (compatible, translated, Teredo) are
    deprecated or unroutable and always blocked.
    """
    if isinstance(ip, IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return _is_blocked_v4(embedded)
        return (
            any(ip in net for net in _BLOCKED_V6)
            # Catch-alls for whatever a later registry update adds.
            or not ip.is_global
            or ip.is_reserved
            or ip.is_multicast
            or ip.is_site_local
        )
    return _is_blocked_v4(ip)


def _is_blocked_v4(ip: IPv4Address) -> bool:
    return any(ip in net for net in _BLOCKED_V4) or not ip.is_global or ip.is_multicast


def _embedded_ipv4(ip: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv4-mapped, 6to4 or NAT64 address leads to, if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return IPv4Address(int(ip) & 0xFFFF_FFFF)
    # Teredo hides the client address and is blocked whole with 2001::/23.
    return None


class CallbackURLError(ValueError):
    """A callback URL that is malformed or whose host is refused; str() is the reason."""


class BlockedAddressError(OSError):
    """A connection refused at delivery time because its address is blocked."""

    def __init__(self, message: str) -> None:
        # An errno and a strerror, so aiohttp's ClientConnectorError shows the message.
        super().__init__(errno.EACCES, message)


@dataclass(frozen=True, slots=True)
class CallbackTarget:
    """Where a callback URL points.

    `host` is lowercased and IDNA-encoded, without IPv6 brackets (compressed form);
    `ip` is set when the host is an address literal, in any form a resolver accepts.
    """

    scheme: str
    host: str
    port: int
    ip: IPAddress | None


# An IPv4 literal ends in a number (the WHATWG URL rule): such hosts are parsed the way the
# OS resolver parses them (inet_aton: 2130706433, 0x7f.1, 127.1, octal 0177.0.0.1), so no
# spelling of 127.0.0.1 passes as a host name.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*", re.ASCII | re.IGNORECASE)
_SCHEME_AND_AUTHORITY = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)", re.ASCII)
_NAME_LABEL = re.compile(r"[a-z0-9_-]{1,63}", re.ASCII)


def parse_callback_url(url: str) -> CallbackTarget:
    """Check the syntax of a callback URL and return where it points.

    Raises CallbackURLError with a reason fit to show the client.
    """
    if not isinstance(url, str):
        raise CallbackURLError("must be a string")
    if len(url) > MAX_URL_CHARS:
        raise CallbackURLError(f"must be at most {MAX_URL_CHARS} characters")
    # isprintable() is False for every control, format and separator character but " ".
    if " " in url or not url.isprintable():
        raise CallbackURLError("must not contain spaces or control characters")
    # Split by hand, not with urlsplit: fewer parser quirks, and each refusal gets a reason.
    match = _SCHEME_AND_AUTHORITY.match(url)
    if match is None or match[1].lower() not in _DEFAULT_PORTS:
        raise CallbackURLError("must be an absolute http or https URL")
    scheme, netloc = match[1].lower(), match[2]
    if "@" in netloc:
        raise CallbackURLError("must not contain a user name or password")
    if not netloc:
        raise CallbackURLError("must have a host")

    ip: IPAddress | None
    if netloc.startswith("["):
        host, ip, port_text = _split_bracketed(netloc)
    else:
        host_text, colon, port_text = netloc.rpartition(":")
        if not colon:
            host_text, port_text = netloc, ""
        elif ":" in host_text:
            raise CallbackURLError(
                "has more than one ':' in its host; IPv6 addresses go in brackets, as in "
                "http://[::1]:8080/"
            )
        host, ip = _parse_host(host_text)

    return CallbackTarget(scheme, host, _parse_port(port_text, scheme), ip)


def _split_bracketed(netloc: str) -> tuple[str, IPv6Address, str]:
    end = netloc.find("]")
    if end < 0:
        raise CallbackURLError("has an unclosed [ in its host")
    inside, rest = netloc[1:end], netloc[end + 1 :]
    if rest and not rest.startswith(":"):
        raise CallbackURLError("has characters after its IPv6 address")
    if "%" in inside:
        raise CallbackURLError("must not use an IPv6 zone identifier")
    try:
        ip = IPv6Address(inside)
    except ValueError:
        raise CallbackURLError("has an invalid IPv6 address in brackets") from None
    return ip.compressed, ip, rest[1:]


def _parse_host(host_text: str) -> tuple[str, IPAddress | None]:
    if not host_text:
        raise CallbackURLError("must have a host")
    host = host_text
    if not host.isascii():
        # Encoded as yarl encodes it, so this is the very name aiohttp will look up.
        try:
            encoded = yarl.URL.build(scheme="http", host=host).raw_host
        except ValueError:  # UnicodeError included
            raise CallbackURLError("has a host name that is not a valid domain name") from None
        if encoded is None:
            raise CallbackURLError("must have a host")
        host = encoded
    host = host.lower()
    try:
        ip = literal_ip(host)
    except ValueError:
        raise CallbackURLError("has a host that is not a valid IPv4 address") from None
    if ip is None:
        _check_name(host)
    return host, ip


def literal_ip(host: str) -> IPAddress | None:
    """The address a host literal stands for; None for a host name.

    Raises ValueError for a malformed literal. `host` carries no brackets.
    """
    if ":" in host:  # only IPv6 literals contain a colon
        return IPv6Address(host)
    bare = host.removesuffix(".")
    if not _NUMERIC_LABEL.fullmatch(bare.rpartition(".")[2]):
        return None
    try:
        return IPv4Address(socket.inet_aton(bare))
    except OSError:
        raise ValueError(f"{host!r} is not an IPv4 address") from None


def _check_name(host: str) -> None:
    bare = host.removesuffix(".")
    if len(bare) > 253 or not all(_NAME_LABEL.fullmatch(label) for label in bare.split(".")):
        raise CallbackURLError("has a host name that is not a valid domain name")


def _parse_port(port_text: str, scheme: str) -> int:
    if not port_text:
        return _DEFAULT_PORTS[scheme]
    # isascii() first: isdigit() alone accepts digits like "²".
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        raise CallbackURLError("must have a port from 1 to 65535")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise CallbackURLError("must have a port from 1 to 65535")
    return port


def is_localhost_name(host: str) -> bool:
    # RFC 6761: these names are loopback whatever DNS says, so they are refused unasked.
    bare = host.removesuffix(".").lower()
    return bare == "localhost" or bare.endswith(".localhost")


def address_or_unspecified(text: str) -> IPAddress:
    try:
        return ip_address(text)
    except ValueError:
        return IPv4Address(0)
