"""AiohttpSender over real sockets: what one POST comes to, whatever the receiver does.

The deliverer's decisions are tested through a scripted sender (test_delivery_scheduling.py);
these tests pin the HTTP half those rely on: the request as given, status and Retry-After
passed on, at most EXCERPT_BYTES of an answer read, no redirect followed, timeouts, refused
connections, and blocked addresses refused before any connection is made.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from relay.sender import EXCERPT_BYTES, AiohttpSender
from tests.delivery import closed_port_url
from tests.helpers import serve_receiver

HEADERS = {"content-type": "application/json", "webhook-id": "msg_1", "relay-attempt": "1"}


@pytest.fixture
async def sender() -> AsyncIterator[AiohttpSender]:
    sending = AiohttpSender(allow_private=True, limit=8, limit_per_host=4)
    yield sending
    await sending.aclose()


async def test_the_post_carries_the_given_headers_and_body(sender: AiohttpSender) -> None:
    """The receiver gets the body byte for byte and every header as given."""
    with serve_receiver() as receiver:
        sent = await sender.post(f"{receiver.url}/hook", HEADERS, b'{"a": 1}', timeout_s=5)
    (received,) = receiver.on("/hook")
    assert received.body == b'{"a": 1}'
    for name, value in HEADERS.items():
        assert received.headers[name] == value
    assert sent.status_code == 200 and sent.error is None and sent.excerpt == "ok"


async def test_status_and_retry_after_are_passed_on(sender: AiohttpSender) -> None:
    """The answer's status and its Retry-After header come back as they were sent."""
    with serve_receiver() as receiver:
        receiver.responses["/busy"] = [(429, {"retry-after": "7"}, 0.0)]
        sent = await sender.post(f"{receiver.url}/busy", HEADERS, b"{}", timeout_s=5)
    assert sent.status_code == 429
    assert sent.retry_after == "7"


async def test_at_most_excerpt_bytes_of_an_answer_are_read(sender: AiohttpSender) -> None:
    """A 1 MiB answer leaves an excerpt of at most EXCERPT_BYTES (a few KiB)."""
    with serve_receiver(bodies={"/down": b"x" * (1024 * 1024)}) as receiver:
        receiver.responses["/down"] = [(500, {}, 0.0)]
        sent = await sender.post(f"{receiver.url}/down", HEADERS, b"{}", timeout_s=5)
    assert sent.status_code == 500
    assert sent.excerpt and set(sent.excerpt) == {"x"}
    assert len(sent.excerpt.encode()) <= EXCERPT_BYTES <= 4096


async def test_an_excerpt_keeps_nul_bytes_and_replaces_bad_utf8(sender: AiohttpSender) -> None:
    """Whatever bytes come back become text (the store makes it storable); no answer body
    is no excerpt."""
    with serve_receiver(bodies={"/nul": b"\x00bad\x00answer\xff"}) as receiver:
        receiver.responses["/empty"] = [(204, {}, 0.0)]
        odd = await sender.post(f"{receiver.url}/nul", HEADERS, b"{}", timeout_s=5)
        empty = await sender.post(f"{receiver.url}/empty", HEADERS, b"{}", timeout_s=5)
    assert odd.excerpt == "\x00bad\x00answer\ufffd"
    assert empty.status_code == 204 and empty.excerpt is None


async def test_a_redirect_is_not_followed(sender: AiohttpSender) -> None:
    """A 302 is the answer: its Location is never fetched."""
    with serve_receiver() as receiver:
        receiver.responses["/moved"] = [(302, {"location": f"{receiver.url}/target"}, 0.0)]
        sent = await sender.post(f"{receiver.url}/moved", HEADERS, b"{}", timeout_s=5)
    assert sent.status_code == 302
    assert receiver.on("/target") == []


async def test_a_slow_answer_times_out(sender: AiohttpSender) -> None:
    """An answer slower than the timeout is no answer, cut off at the timeout."""
    with serve_receiver() as receiver:
        receiver.responses["/slow"] = [(200, {}, 1.0)]
        started = time.monotonic()
        sent = await sender.post(f"{receiver.url}/slow", HEADERS, b"{}", timeout_s=0.3)
        elapsed_s = time.monotonic() - started
    assert sent.status_code is None
    assert sent.error == "timed out after 0.3 s"
    assert elapsed_s < 0.9


async def test_a_refused_connection_is_an_error(sender: AiohttpSender) -> None:
    """Nobody listening is no answer, with the reason."""
    sent = await sender.post(closed_port_url(), HEADERS, b"{}", timeout_s=5)
    assert sent.status_code is None
    assert sent.error is not None and sent.error.startswith("connection failed")


async def test_blocked_addresses_are_refused_before_connecting() -> None:
    """Without private callbacks, a literal loopback address and `localhost` are refused and
    the receiver on them gets nothing."""
    strict = AiohttpSender(allow_private=False, limit=8, limit_per_host=4)
    try:
        with serve_receiver() as receiver:
            port = receiver.url.rsplit(":", 1)[1]
            literal = await strict.post(f"http://127.0.0.1:{port}/a", HEADERS, b"{}", 5)
            named = await strict.post(f"http://localhost:{port}/b", HEADERS, b"{}", 5)
    finally:
        await strict.aclose()
    assert receiver.received == []
    for sent in (literal, named):
        assert sent.status_code is None
        assert sent.error is not None and "blocked" in sent.error and "refused" in sent.error
