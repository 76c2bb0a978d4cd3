"""The private-address rule: blocked addresses, callback URL syntax, vetting, the resolver."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from relay import resolver
from relay.addresses import (
    BlockedAddressError,
    CallbackTarget,
    CallbackURLError,
    is_blocked_ip,
    parse_callback_url,
    receiver_host,
)
from relay.resolver import IntakeResolver, VettingResolver
from tests.helpers import serve_in_thread

BLOCKED = [
    # IPv4
    "127.0.0.1",  # loopback
    "127.255.255.254",
    "10.0.0.1",  # private
    "10.255.255.255",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "100.64.0.1",  # carrier-grade NAT
    "100.127.255.254",
    "169.254.169.254",  # link-local: cloud metadata
    "0.0.0.0",  # unspecified
    "0.1.2.3",  # "this network"
    "255.255.255.255",  # broadcast
    "224.0.0.1",  # multicast
    "239.255.255.250",
    "240.0.0.1",  # reserved
    "192.0.0.8",  # IETF protocol assignments
    "192.0.2.1",  # documentation
    "198.51.100.7",
    "203.0.113.9",
    "198.18.0.1",  # benchmarking
    "192.88.99.1",  # 6to4 relay anycast
    # IPv6
    "::1",  # loopback
    "::",  # unspecified
    "fe80::1",  # link-local
    "fe80::1%eth0",
    "fc00::1",  # unique-local
    "fd12:3456:789a::1",
    "fec0::1",  # site-local
    "ff02::1",  # multicast
    "ff0e::1",
    "100::1",  # discard-only
    "2001:db8::1",  # documentation
    "3fff::1",
    "2001::1",  # Teredo
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:0.0.0.0",
    "::127.0.0.1",  # IPv4-compatible (deprecated)
    "::93.184.216.34",
    "::ffff:0:127.0.0.1",  # IPv4-translated
    "::ffff:0:93.184.216.34",
    "2002:7f00:1::1",  # 6to4 around 127.0.0.1
    "2002:c0a8:101::1",  # 6to4 around 192.168.1.1
    "2002:a9fe:a9fe::",  # 6to4 around 169.254.169.254
    "64:ff9b::127.0.0.1",  # NAT64 around 127.0.0.1
    "64:ff9b::a00:1",  # NAT64 around 10.0.0.1
    "64:ff9b:1::5db8:d822",  # local-use NAT64
]

ALLOWED = [
    "93.184.216.34",
    "8.8.8.8",
    "1.1.1.1",
    "100.63.255.255",  # just below carrier-grade NAT
    "100.128.0.0",  # just above it
    "172.15.255.255",
    "172.32.0.0",
    "192.167.255.255",
    "2606:2800:220:1:248:1893:25c8:1946",
    "2001:4860:4860::8888",
    "::ffff:93.184.216.34",  # IPv4-mapped public address
    "2002:5db8:d822::1",  # 6to4 around a public address
    "64:ff9b::93.184.216.34",  # NAT64 (DNS64) around a public address
]


@pytest.mark.parametrize("text", BLOCKED)
def test_blocked_addresses(text: str) -> None:
    """Every loopback, private, link-local, reserved, multicast or wrapped form is blocked."""
    assert is_blocked_ip(ip_address(text))


@pytest.mark.parametrize("text", ALLOWED)
def test_public_addresses_are_allowed(text: str) -> None:
    """Public unicast addresses, bare or wrapped around a public IPv4, are allowed."""
    assert not is_blocked_ip(ip_address(text))


V4 = IPv4Address
V6 = IPv6Address
LOOPBACK = V4("127.0.0.1")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://example.com/hook", CallbackTarget("https", "example.com", 443, None)),
        ("http://Example.COM:8080/x?y=1#z", CallbackTarget("http", "example.com", 8080, None)),
        ("HTTPS://example.com", CallbackTarget("https", "example.com", 443, None)),
        ("http://example.com:/", CallbackTarget("http", "example.com", 80, None)),
        ("http://example.com:0080/", CallbackTarget("http", "example.com", 80, None)),
        ("http://example.com./", CallbackTarget("http", "example.com.", 80, None)),
        ("http://a_b.example.com/", CallbackTarget("http", "a_b.example.com", 80, None)),
        ("http://deadbeef.cafe/", CallbackTarget("http", "deadbeef.cafe", 80, None)),
        ("http://1.2.3.4.example/", CallbackTarget("http", "1.2.3.4.example", 80, None)),
        ("http://bücher.example/", CallbackTarget("http", "xn--bcher-kva.example", 80, None)),
        ("http://ÖBB.at/", CallbackTarget("http", "xn--bb-eka.at", 80, None)),
        ("http://[::1]:8080/", CallbackTarget("http", "::1", 8080, V6("::1"))),
        (
            "https://[2606:2800:0220:0001:0248:1893:25C8:1946]/",
            CallbackTarget(
                "https",
                "2606:2800:220:1:248:1893:25c8:1946",
                443,
                V6("2606:2800:220:1:248:1893:25c8:1946"),
            ),
        ),
        (
            "http://[::FFFF:127.0.0.1]/",
            CallbackTarget("http", "::ffff:7f00:1", 80, V6("::ffff:127.0.0.1")),
        ),
        ("http://93.184.216.34/", CallbackTarget("http", "93.184.216.34", 80, V4("93.184.216.34"))),
        ("http://127.0.0.1:9/", CallbackTarget("http", "127.0.0.1", 9, LOOPBACK)),
        # The odd forms OS resolvers accept all mean 127.0.0.1 and are parsed as such.
        ("http://2130706433/", CallbackTarget("http", "2130706433", 80, LOOPBACK)),
        ("http://0x7f.1/", CallbackTarget("http", "0x7f.1", 80, LOOPBACK)),
        ("http://0X7F000001/", CallbackTarget("http", "0x7f000001", 80, LOOPBACK)),
        ("http://127.1/", CallbackTarget("http", "127.1", 80, LOOPBACK)),
        ("http://0177.0.0.1/", CallbackTarget("http", "0177.0.0.1", 80, LOOPBACK)),
        ("http://017700000001/", CallbackTarget("http", "017700000001", 80, LOOPBACK)),
        ("http://127.0.0.1./", CallbackTarget("http", "127.0.0.1.", 80, LOOPBACK)),
        (
            "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/",  # fullwidth digits
            CallbackTarget("http", "127.0.0.1", 80, LOOPBACK),
        ),
        ("http://0/", CallbackTarget("http", "0", 80, V4("0.0.0.0"))),
    ],
)
def test_parse_callback_url_accepts(url: str, expected: CallbackTarget) -> None:
    """Valid http(s) URLs parse into scheme, normalised host, port and literal address."""
    assert parse_callback_url(url) == expected


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/", "absolute http or https"),
        ("example.com/hook", "absolute http or https"),
        ("//example.com/hook", "absolute http or https"),
        ("javascript:alert(1)", "absolute http or https"),
        ("", "absolute http or https"),
        ("http:///path", "must have a host"),
        ("http://", "must have a host"),
        ("http://:8080/", "must have a host"),
        ("http://user:pass@example.com/", "user name or password"),
        ("http://user@example.com/", "user name or password"),
        ("http://evil.example\\@127.0.0.1/", "user name or password"),
        ("https://example.com/" + "a" * 2029, "at most 2048 characters"),
        ("http://exa mple.com/", "spaces or control characters"),
        (" http://example.com/", "spaces or control characters"),
        ("http://example.com/\n", "spaces or control characters"),
        ("http://example.com/\ta", "spaces or control characters"),
        ("http://example.com/\x00", "spaces or control characters"),
        ("http://example.com/\x7f", "spaces or control characters"),
        ("http://exa\u200bmple.com/", "spaces or control characters"),
        ("http://example.com/\u202e", "spaces or control characters"),
        ("http://example.com:0/", "port from 1 to 65535"),
        ("http://example.com:65536/", "port from 1 to 65535"),
        ("http://example.com:123456/", "port from 1 to 65535"),
        ("http://example.com:http/", "port from 1 to 65535"),
        ("http://example.com:-1/", "port from 1 to 65535"),
        ("http://example.com:\u00b2/", "port from 1 to 65535"),
        ("http://::1/", "IPv6 addresses go in brackets"),
        ("http://example.com:80:80/", "IPv6 addresses go in brackets"),
        ("http://[::1/", "unclosed"),
        ("http:example.com", "absolute http or https"),
        ("http:/example.com", "absolute http or https"),
        ("http://[::1]x/", "characters after its IPv6 address"),
        ("http://[127.0.0.1]/", "invalid IPv6 address"),
        ("http://[fe80::1%25eth0]/", "zone identifier"),
        ("http://256.1.1.1/", "not a valid IPv4 address"),
        ("http://1.2.3.4.5/", "not a valid IPv4 address"),
        ("http://4294967296/", "not a valid IPv4 address"),
        ("http://example.123/", "not a valid IPv4 address"),
        ("http://0xg.1/", "not a valid IPv4 address"),
        ("http://exa%2Emple.com/", "not a valid domain name"),
        ("http://a..b/", "not a valid domain name"),
        ("http://" + "a" * 64 + ".com/", "not a valid domain name"),
        ("http://ex<ample.com/", "not a valid domain name"),
    ],
)
def test_parse_callback_url_refuses(url: str, reason: str) -> None:
    """Malformed callback URLs are refused with a reason fit to show the client."""
    with pytest.raises(CallbackURLError, match=reason):
        parse_callback_url(url)


def test_url_of_exactly_2048_characters_is_accepted() -> None:
    """The length limit is inclusive."""
    url = "https://example.com/" + "a" * 2028
    assert len(url) == 2048
    assert parse_callback_url(url).host == "example.com"


def test_callback_url_error_is_a_value_error() -> None:
    """Callers validating input can treat a refusal as an ordinary ValueError."""
    with pytest.raises(ValueError):
        parse_callback_url(123)  # type: ignore[arg-type]


# --- vet_callback_url ------------------------------------------------------------------


class FakeDNS:
    """Stands in for the intake resolver's DNS and counts the lookups."""

    def __init__(self, answers: dict[str, list[str]], delay_s: float = 0.0) -> None:
        self.answers = answers
        self.delay_s = delay_s
        self.lookups: list[str] = []

    async def lookup(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        await asyncio.sleep(self.delay_s)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.answers[host])


@pytest.fixture
async def fake_dns() -> FakeDNS:
    return FakeDNS(
        {
            "public.example": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
            "mixed.example": ["93.184.216.34", "10.0.0.7"],
            "mapped.example": ["::ffff:127.0.0.1"],
            "rebind.example": ["127.0.0.1"],
        }
    )


@pytest.fixture
async def intake(fake_dns: FakeDNS) -> IntakeResolver:
    return IntakeResolver(lookup=fake_dns.lookup)


async def test_allow_private_skips_every_address_check(
    fake_dns: FakeDNS, intake: IntakeResolver
) -> None:
    """With private callbacks allowed, loopback URLs pass and DNS is never asked."""
    target = await intake.vet("http://localhost:8000/hook", allow_private=True)
    assert target == CallbackTarget("http", "localhost", 8000, None)
    assert (await intake.vet("http://127.0.0.1:9/", allow_private=True)).ip == LOOPBACK
    assert fake_dns.lookups == []


async def test_allow_private_still_checks_syntax(intake: IntakeResolver) -> None:
    """Allowing private callbacks does not allow malformed URLs."""
    with pytest.raises(CallbackURLError, match="user name or password"):
        await intake.vet("http://u:p@localhost/", allow_private=True)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://10.1.2.3:8080/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[fd00::1]/",
        "http://[64:ff9b::7f00:1]/",
        "http://2130706433/",
        "http://0x7f.1/",
        "http://127.1/",
        "http://0/",
    ],
)
async def test_blocked_literal_hosts_are_refused(
    url: str, fake_dns: FakeDNS, intake: IntakeResolver
) -> None:
    """A host that is a blocked address, in any spelling, is refused without DNS."""
    with pytest.raises(CallbackURLError, match="resolves to a private/loopback address"):
        await intake.vet(url, allow_private=False)
    assert fake_dns.lookups == []


async def test_public_literal_host_passes_without_dns(
    fake_dns: FakeDNS, intake: IntakeResolver
) -> None:
    """A public address literal is accepted as it is."""
    target = await intake.vet("https://93.184.216.34/hook", allow_private=False)
    assert target.ip == V4("93.184.216.34")
    assert fake_dns.lookups == []


@pytest.mark.parametrize(
    "url", ["http://localhost/", "http://LOCALHOST.:8080/", "http://app.localhost/"]
)
async def test_localhost_names_are_refused_without_asking_dns(
    url: str, fake_dns: FakeDNS, intake: IntakeResolver
) -> None:
    """localhost and *.localhost are loopback by definition; DNS is not consulted."""
    with pytest.raises(CallbackURLError, match="resolves to a private/loopback address"):
        await intake.vet(url, allow_private=False)
    assert fake_dns.lookups == []


async def test_name_resolving_to_public_addresses_passes(
    fake_dns: FakeDNS, intake: IntakeResolver
) -> None:
    """A host name whose every address is public is accepted."""
    target = await intake.vet("https://public.example/hook", allow_private=False)
    assert target == CallbackTarget("https", "public.example", 443, None)
    assert fake_dns.lookups == ["public.example"]


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("mixed.example", "10.0.0.7"),
        ("mapped.example", "::ffff:7f00:1"),
        ("rebind.example", "127.0.0.1"),
    ],
)
async def test_name_resolving_to_any_blocked_address_is_refused(
    host: str, address: str, fake_dns: FakeDNS, intake: IntakeResolver
) -> None:
    """One blocked address among the answers is enough to refuse the host name."""
    with pytest.raises(CallbackURLError, match=f"host {host} resolves to a private/loop") as info:
        await intake.vet(f"https://{host}/hook", allow_private=False)
    assert address in str(info.value)


async def test_unresolvable_name_is_refused(fake_dns: FakeDNS, intake: IntakeResolver) -> None:
    """A host name that does not resolve is refused with that reason."""
    with pytest.raises(CallbackURLError, match=r"host name nowhere\.invalid does not resolve"):
        await intake.vet("https://nowhere.invalid/hook", allow_private=False)


async def test_slow_resolution_is_cut_off(fake_dns: FakeDNS) -> None:
    """A lookup that outlasts resolve_timeout_s is refused rather than awaited."""
    fake_dns.delay_s = 5.0
    async with asyncio.timeout(2.0):
        with pytest.raises(
            CallbackURLError, match=r"does not resolve \(no answer within 0\.05 s\)"
        ):
            await IntakeResolver(lookup=fake_dns.lookup, timeout_s=0.05).vet(
                "https://public.example/", allow_private=False
            )


async def test_public_resolutions_are_cached(fake_dns: FakeDNS, intake: IntakeResolver) -> None:
    """Repeated vetting of one public host name costs one lookup."""
    for _ in range(100):
        await intake.vet("https://public.example/hook", allow_private=False)
    assert fake_dns.lookups == ["public.example"]


async def test_refusals_are_not_cached(fake_dns: FakeDNS, intake: IntakeResolver) -> None:
    """A refused host name is looked up again next time, so a fixed DNS record is seen."""
    for _ in range(2):
        with pytest.raises(CallbackURLError):
            await intake.vet("https://mixed.example/", allow_private=False)
    fake_dns.answers["mixed.example"] = ["93.184.216.34"]
    await intake.vet("https://mixed.example/", allow_private=False)
    assert fake_dns.lookups == ["mixed.example"] * 3


def test_resolution_cache_entries_expire() -> None:
    """A cached host name is forgotten once its time to live has passed."""
    now = [1000.0]
    cache = resolver._PublicNames(ttl_s=30.0, max_entries=8, clock=lambda: now[0])
    cache.add("a.example")
    now[0] += 29.9
    assert "a.example" in cache
    now[0] += 0.2
    assert "a.example" not in cache
    assert len(cache) == 0


def test_resolution_cache_is_bounded() -> None:
    """The cache never holds more than max_entries names, dropping the oldest first."""
    cache = resolver._PublicNames(ttl_s=30.0, max_entries=3, clock=lambda: 0.0)
    for name in ["a", "b", "c", "d", "e"]:
        cache.add(name)
    assert len(cache) == 3
    assert "a" not in cache and "b" not in cache
    assert all(name in cache for name in ["c", "d", "e"])


# --- VettingResolver ---------------------------------------------------------------------


class StaticResolver(AbstractResolver):
    """An aiohttp resolver with fixed answers, to stand in for DNS."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self.answers:
            raise OSError(socket.EAI_NONAME, "Name or service not known")
        return [
            ResolveResult(
                hostname=host,
                host=text,
                port=port,
                family=socket.AF_INET6 if ":" in text else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for text in self.answers[host]
        ]

    async def close(self) -> None:
        self.closed = True


async def test_resolver_refuses_localhost() -> None:
    """Resolving localhost is refused with a message naming the host."""
    resolver = VettingResolver()
    with pytest.raises(BlockedAddressError, match="refused: localhost resolves only to blocked"):
        await resolver.resolve("localhost", 80)
    await resolver.close()


async def test_resolver_passes_a_public_literal_through() -> None:
    """A public address given as the host comes back unchanged."""
    resolver = VettingResolver()
    results = await resolver.resolve("93.184.216.34", 443, socket.AF_INET)
    assert [(r["host"], r["port"]) for r in results] == [("93.184.216.34", 443)]
    await resolver.close()


async def test_resolver_refuses_a_blocked_literal() -> None:
    """A blocked address given as the host is refused too."""
    with pytest.raises(BlockedAddressError):
        await VettingResolver().resolve("127.0.0.1", 80, socket.AF_INET)


async def test_resolver_keeps_only_unblocked_addresses() -> None:
    """Blocked addresses are dropped from an answer; the public ones remain, in order."""
    inner = StaticResolver(
        {
            "mixed.example": [
                "127.0.0.1",
                "93.184.216.34",
                "::ffff:10.0.0.1",
                "fe80::1%eth0",
                "2606:2800:220:1:248:1893:25c8:1946",
            ]
        }
    )
    results = await VettingResolver(inner=inner).resolve("mixed.example", 443, socket.AF_UNSPEC)
    assert [r["host"] for r in results] == [
        "93.184.216.34",
        "2606:2800:220:1:248:1893:25c8:1946",
    ]


async def test_resolver_refuses_a_name_with_only_blocked_addresses() -> None:
    """A name whose every address is blocked is refused, whatever it is called."""
    inner = StaticResolver({"rebind.example": ["127.0.0.1", "::1", "169.254.169.254"]})
    with pytest.raises(BlockedAddressError) as info:
        await VettingResolver(inner=inner).resolve("rebind.example", 80)
    assert str(info.value.strerror) == "refused: rebind.example resolves only to blocked addresses"


async def test_resolver_in_allow_mode_passes_everything() -> None:
    """With private callbacks allowed the resolver filters nothing."""
    inner = StaticResolver({"localhost": ["127.0.0.1", "::1"]})
    results = await VettingResolver(allow_private=True, inner=inner).resolve("localhost", 80)
    assert [r["host"] for r in results] == ["127.0.0.1", "::1"]


async def test_resolver_closes_only_the_inner_resolver_it_made() -> None:
    """An injected inner resolver belongs to the caller and is left open."""
    inner = StaticResolver({})
    await VettingResolver(inner=inner).close()
    assert not inner.closed


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "10.0.0.1",
        "::1",
        "[::1]",
        "::ffff:7f00:1",
        "fe80::1%25eth0",
        "2130706433",
        "0x7f.1",
        "127.1",
        "1.2.3.4.5",  # a malformed literal is refused, not waved through
    ],
)
def test_check_literal_refuses_blocked_literals(host: str) -> None:
    """Address literals, which aiohttp never resolves, are checked here instead."""
    with pytest.raises(BlockedAddressError, match="refused: "):
        VettingResolver().check_literal(host)


@pytest.mark.parametrize(
    "host", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "[2001:4860:4860::8888]"]
)
def test_check_literal_passes_public_literals_and_names(host: str) -> None:
    """Public literals pass check_literal; so do names, which resolve() checks."""
    VettingResolver().check_literal(host)
    VettingResolver().check_literal("example.com")


def test_check_literal_in_allow_mode_passes_everything() -> None:
    """With private callbacks allowed, loopback literals pass."""
    VettingResolver(allow_private=True).check_literal("127.0.0.1")


# --- end to end: a real aiohttp session against a real local server ----------------------


async def _ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


@pytest.fixture(scope="module")
def local_port() -> Iterator[int]:
    with serve_in_thread(Starlette(routes=[Route("/", _ok)])) as base_url:
        yield int(base_url.rsplit(":", 1)[1])


async def _get(resolver: VettingResolver, url: str) -> tuple[int, str]:
    connector = aiohttp.TCPConnector(resolver=resolver)
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.get(url, allow_redirects=False) as response,
    ):
        return response.status, await response.text()


async def test_session_with_vetting_resolver_refuses_localhost(local_port: int) -> None:
    """A real request to http://localhost:<port>/ fails with the refusal, never connecting."""
    with pytest.raises(aiohttp.ClientConnectorError) as info:
        await _get(VettingResolver(), f"http://localhost:{local_port}/")
    assert isinstance(info.value.os_error, BlockedAddressError)
    assert "refused: localhost resolves only to blocked addresses" in str(info.value)


async def test_session_refuses_a_name_that_resolves_to_loopback(local_port: int) -> None:
    """A harmless-looking name whose DNS answer is 127.0.0.1 is refused at connect time."""
    inner = StaticResolver({"callback.example": ["127.0.0.1"]})
    with pytest.raises(aiohttp.ClientConnectorError) as info:
        await _get(VettingResolver(inner=inner), f"http://callback.example:{local_port}/")
    assert isinstance(info.value.os_error, BlockedAddressError)


async def test_session_in_allow_mode_reaches_the_local_server(local_port: int) -> None:
    """With private callbacks allowed, the same requests reach the server."""
    assert await _get(VettingResolver(allow_private=True), f"http://localhost:{local_port}/") == (
        200,
        "ok",
    )
    inner = StaticResolver({"callback.example": ["127.0.0.1"]})
    resolver = VettingResolver(allow_private=True, inner=inner)
    assert await _get(resolver, f"http://callback.example:{local_port}/") == (200, "ok")


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://hooks.example.com/a", "hooks.example.com:443"),
        ("http://hooks.example.com/a", "hooks.example.com:80"),
        ("HTTPS://Hooks.EXAMPLE.com:8443/a?b=1#c", "hooks.example.com:8443"),
        ("https://user:pw@hooks.example.com/a", "hooks.example.com:443"),
        ("http://[2606:4700::1111]:8080/a", "2606:4700::1111:8080"),
        ("http://93.184.216.34/a", "93.184.216.34:80"),
        # The same host as aiohttp's pool sees it, whatever the spelling.
        ("http://[0:0::1]/", "::1:80"),
        ("http://\uff45xample.com/", "example.com:80"),  # fullwidth e
        ("http://B\u00fccher.example/", "xn--bcher-kva.example:80"),
        ("https://hooks.example.com:99999/a", "hooks.example.com:0"),  # never raises
    ],
)
def test_receiver_host_is_the_lowercased_host_and_effective_port(url: str, host: str) -> None:
    assert receiver_host(url) == host
