"""Helpers shared by the delivery tests: the relay on a socket, its API, callback checks.

`running_relay` serves the real app; with a `sender` (tests/senders.py) its callbacks go to
that sender instead of over HTTP. `assert_callback` checks a callback as received (by a real
receiver or a scripted sender) with the independent `standardwebhooks` package.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
from standardwebhooks.webhooks import Webhook

from relay import __version__
from relay.app import Role, create_app
from relay.config import Settings
from relay.sender import CallbackSender
from relay.simulator import FakeUpstream, FinalStatus, Generation
from relay.store import NewKey
from tests.helpers import Received, serve_in_thread, wait_for

SCHEDULE_S = (0.1, 0.2, 0.3)  # fast_settings' retry schedule: 4 attempts in all
NEVER_S = 3600.0  # a generation that stays IN_PROGRESS for the whole test


@contextlib.asynccontextmanager
async def running_relay(
    settings: Settings, key: NewKey, role: Role = "all", sender: CallbackSender | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The relay app on a real socket (callbacks sent by `sender`, else over HTTP); yields an
    API client authenticated with `key`."""
    app = create_app(settings, role=role, sender=sender)
    with serve_in_thread(app) as base:
        async with httpx.AsyncClient(
            base_url=base, headers={"authorization": f"Bearer {key.api_key}"}, timeout=10
        ) as client:
            yield client


async def subscribe(client: httpx.AsyncClient, generation_id: str, url: str) -> dict[str, Any]:
    response = await client.post(
        "/v1/subscriptions", json={"generation_id": generation_id, "callback_url": url}
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def get_sub(client: httpx.AsyncClient, sub_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/subscriptions/{sub_id}")
    assert response.status_code == 200, response.text
    sub: dict[str, Any] = response.json()
    return sub


async def get_attempts(client: httpx.AsyncClient, sub_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/subscriptions/{sub_id}/attempts")
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def wait_status(
    client: httpx.AsyncClient, sub_id: str, status: str, timeout_s: float = 10.0
) -> dict[str, Any]:
    """Wait until the subscription has `status` and its attempts are all recorded."""

    async def reached() -> dict[str, Any] | None:
        sub = await get_sub(client, sub_id)
        return sub if sub["status"] == status else None

    try:
        sub: dict[str, Any] = await wait_for(reached, timeout_s=timeout_s)
    except TimeoutError:
        last = await get_sub(client, sub_id)
        raise AssertionError(f"subscription never became {status}: {last}") from None
    return sub


def verified(callback: Received, key: NewKey) -> dict[str, Any]:
    """The callback's body after its signature checks out with the key's secret."""
    payload: dict[str, Any] = Webhook(key.signing_secret).verify(callback.body, callback.headers)
    return payload


def assert_callback(
    callback: Received,
    key: NewKey,
    *,
    sub_id: str,
    event: str,
    attempt: int,
    gen: Generation | None = None,
) -> dict[str, Any]:
    """Check one callback's signature and every header the contract names; return its body."""
    body = verified(callback, key)
    headers = callback.headers
    assert headers["content-type"] == "application/json"
    assert headers["relay-event"] == event
    assert headers["relay-subscription-id"] == sub_id
    assert headers["relay-attempt"] == str(attempt)
    assert headers["user-agent"] == f"relay/{__version__}"
    assert headers["webhook-signature"].startswith("v1,")
    # The timestamp is this attempt's: within a few seconds of when it arrived.
    assert abs(int(headers["webhook-timestamp"]) - callback.at) < 3
    if gen is not None:
        expected = gen.body(2)
        assert body == expected
        assert list(body) == list(expected)  # same fields, in upstream's order
    return body


def closed_port_url() -> str:
    """A loopback URL nobody listens on: connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def final_generation(
    sim: FakeUpstream, gen_id: str, status: FinalStatus = "COMPLETED"
) -> Generation:
    """A generation that is final 0.1 s from now."""
    return sim.add_generation("image", id=gen_id, queue_s=0.0, run_s=0.1, final_status=status)


def pending_generation(sim: FakeUpstream, gen_id: str) -> Generation:
    """A generation that stays IN_PROGRESS until the test finishes it."""
    return sim.add_generation("image", id=gen_id, queue_s=0.0, run_s=NEVER_S)
