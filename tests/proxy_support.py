"""Helpers shared by the tests of creates through the relay: the simulator and a relay app on
real sockets, a client of both, and what the simulator saw.

The simulator runs in its own thread and event loop, so tests drive it over HTTP only (its
control API under /_fake/), never by touching its state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from relay.app import Role, create_app
from relay.simulator import FakeUpstream, FakeUpstreamConfig
from tests.apiclient import PUBLIC_HOOK
from tests.helpers import UPSTREAM_KEY, fast_settings, new_key, serve_in_thread

MODEL_PATH = "/v1/generation/flux/dev"


@contextlib.contextmanager
def simulator(time_scale: float = 0.01) -> Iterator[tuple[FakeUpstream, str]]:
    """The upstream simulator (bearer UPSTREAM_KEY) on a real socket: (state, base URL)."""
    sim = FakeUpstream(FakeUpstreamConfig(api_key=UPSTREAM_KEY, seed=7, time_scale=time_scale))
    with serve_in_thread(sim.app) as url:
        yield sim, url


@dataclass
class Rig:
    """A relay app and the simulator behind it, each with an httpx client."""

    db_url: str
    relay: httpx.AsyncClient
    upstream: httpx.AsyncClient
    key: str

    async def create(
        self,
        body: Any = None,
        *,
        path: str = MODEL_PATH,
        callback_url: str | None = PUBLIC_HOOK,
        key: str | None = None,
        headers: Mapping[str, str | bytes] | None = None,
        content: Any = None,
    ) -> httpx.Response:
        """POST a create through the relay (JSON `body`, or raw `content`)."""
        sent: dict[str, str | bytes] = {
            "authorization": f"Bearer {key or self.key}",
            **(headers or {}),
        }
        if callback_url is not None:
            sent["relay-callback-url"] = callback_url
        if content is None:
            content = orjson.dumps({"prompt": "a cat"} if body is None else body)
            sent.setdefault("content-type", "application/json")
        # As bytes: a header value may be UTF-8 (Relay-Metadata), which httpx's str refuses.
        raw = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in sent.items()}
        async with asyncio.timeout(30):
            return await self.relay.post(path, content=content, headers=raw)

    async def upstream_creates(self) -> list[dict[str, Any]]:
        """Every create the simulator received, oldest first."""
        answer = await self.upstream.get("/_fake/creates")
        assert answer.status_code == 200, answer.text
        items: list[dict[str, Any]] = answer.json()["items"]
        return items

    async def faults(self, **changes: Any) -> None:
        answer = await self.upstream.put("/_fake/faults", json=changes)
        assert answer.status_code == 200, answer.text

    async def subscriptions(self, key: str | None = None) -> list[dict[str, Any]]:
        answer = await self.relay.get(
            "/v1/subscriptions", headers={"authorization": f"Bearer {key or self.key}"}
        )
        assert answer.status_code == 200, answer.text
        items: list[dict[str, Any]] = answer.json()["items"]
        return items


@contextlib.asynccontextmanager
async def rig(
    db_url: str,
    upstream_url: str,
    *,
    role: Role = "api",
    reset_upstream: bool = True,
    **settings: Any,
) -> AsyncIterator[Rig]:
    """A relay app (`role`, fast test settings, public callbacks only unless `settings` says
    otherwise) in front of the simulator at `upstream_url` (reset first), and a fresh client
    key."""
    changes = {"allow_private_callbacks": False, **settings}
    app = create_app(fast_settings(db_url, upstream_url, **changes), role=role)
    key = (await new_key(db_url)).api_key
    with serve_in_thread(app) as relay_url:
        async with (
            httpx.AsyncClient(base_url=relay_url, timeout=30) as relay,
            httpx.AsyncClient(base_url=upstream_url, timeout=10) as upstream,
        ):
            if reset_upstream:
                reset = await upstream.post(
                    "/_fake/reset", json={"generations": True, "faults": True}
                )
                assert reset.status_code == 200, reset.text
            yield Rig(db_url, relay, upstream, key)


def proxy_fixtures() -> tuple[Any, Any]:
    """Fixtures `upstream` (one simulator for the module: its state and URL) and `proxy` (a
    Rig per test, on the `db_url` database); assign them to those names in the test module."""

    @pytest.fixture(scope="module", name="upstream")
    def upstream_fixture() -> Iterator[tuple[FakeUpstream, str]]:
        with simulator() as served:
            yield served

    @pytest.fixture(name="proxy")
    async def proxy_fixture(db_url: str, upstream: tuple[FakeUpstream, str]) -> AsyncIterator[Rig]:
        async with rig(db_url, upstream[1]) as served:
            yield served

    return upstream_fixture, proxy_fixture
