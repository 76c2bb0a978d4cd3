"""Helpers for the simulator's own tests: a simulator on a real socket, a reset client, and
the control API calls every simulator test makes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from relay.simulator import FakeUpstream, FakeUpstreamConfig
from tests.helpers import serve_in_thread

KEY = "test-upstream-key"
AUTH = {"authorization": f"Bearer {KEY}"}
TIME_SCALE = 0.001  # drawn video lifecycles take 0.06-0.3 s


@contextlib.contextmanager
def serve_simulator(**config: Any) -> Iterator[tuple[FakeUpstream, str]]:
    """A simulator (KEY, seed 7, TIME_SCALE unless `config` says otherwise) under uvicorn."""
    settings = {"api_key": KEY, "seed": 7, "time_scale": TIME_SCALE, **config}
    sim = FakeUpstream(FakeUpstreamConfig(**settings))
    with serve_in_thread(sim.app) as url:
        yield sim, url


@contextlib.asynccontextmanager
async def reset_client(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client with the bearer key, after resetting generations, faults and webhooks."""
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=5) as http:
        reset = await http.post(
            "/_fake/reset", json={"generations": True, "faults": True, "webhooks": True}
        )
        assert reset.status_code == 200, reset.text
        yield http


def simulator_fixtures(**config: Any) -> tuple[Any, Any]:
    """Fixtures `served` (one simulator for the module: its state and URL) and `client` (a
    reset client for each test); assign them to those names in the test module."""

    @pytest.fixture(scope="module", name="served")
    def served_fixture() -> Iterator[tuple[FakeUpstream, str]]:
        with serve_simulator(**config) as served:
            yield served

    @pytest.fixture(name="client")
    async def client_fixture(
        served: tuple[FakeUpstream, str],
    ) -> AsyncIterator[httpx.AsyncClient]:
        async with reset_client(served[1]) as http:
            yield http

    return served_fixture, client_fixture


async def create(client: httpx.AsyncClient, **spec: Any) -> dict[str, Any]:
    answer = await client.post("/_fake/generations", json=spec)
    assert answer.status_code == 201, answer.text
    created: dict[str, Any] = answer.json()
    return created


async def poll_json(client: httpx.AsyncClient, gen_id: str) -> dict[str, Any]:
    answer = await client.get(f"/v1/generation/{gen_id}")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def statuses_until_final(
    client: httpx.AsyncClient, gen_id: str, deadline_s: float = 3.0
) -> list[str]:
    """Poll every 10 ms until a final status; return the distinct statuses seen, in order."""
    seen: list[str] = []
    async with asyncio.timeout(deadline_s):
        while True:
            status = (await poll_json(client, gen_id))["status"]
            if not seen or seen[-1] != status:
                seen.append(status)
            if status.upper() in ("COMPLETED", "SUCCEEDED", "FAILED", "CANCELED"):
                return seen
            await asyncio.sleep(0.01)


async def set_faults(client: httpx.AsyncClient, **faults: Any) -> dict[str, Any]:
    answer = await client.put("/_fake/faults", json=faults)
    assert answer.status_code == 200, answer.text
    current: dict[str, Any] = answer.json()
    return current


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    answer = await client.get("/_fake/stats")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body
