"""A relay killed (SIGKILL) in the middle of a create through it, restarted, and the client
retrying with its Idempotency-Key: the generation is never created twice, and it ends
subscribed when the crash came after the commit. On SQLite and PostgreSQL.

`relay serve` runs as a real process with the test seam RELAY_FAILPOINT, which makes it
SIGKILL itself at the named point: after the subscription and the answer are committed but
before the answer is written, or after the upstream's answer but before the commit (the one
window that cannot be closed: the retry must then get a clear error, never a second create).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from relay.simulator import FakeUpstream
from tests.apiclient import expect_error
from tests.helpers import Receiver, log_tail, new_key, relay_process, serve_env, wait_for
from tests.proxy_support import MODEL_PATH, simulator

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[FakeUpstream, str]]:
    with simulator() as served:
        yield served


def relay_env(db_url: str, upstream_url: str, **extra: str) -> dict[str, str]:
    return serve_env(
        db_url,
        upstream_url,
        RELAY_POLL_MAX_INTERVAL="0.5",
        RELAY_DELIVERY_RETRY_SCHEDULE="0.2,0.5",
        RELAY_LEASE="1",
        RELAY_LOG_LEVEL="INFO",
        **extra,
    )


@contextlib.asynccontextmanager
async def reset(upstream_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=upstream_url, timeout=10) as sim:
        answer = await sim.post("/_fake/reset", json={"generations": True, "faults": True})
        assert answer.status_code == 200, answer.text
        yield sim


async def send(base_url: str, key: str, callback_url: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url, timeout=20) as client:
        return await client.post(
            MODEL_PATH,
            content=orjson.dumps({"prompt": "a cat in a storm"}),
            headers={
                "authorization": f"Bearer {key}",
                "content-type": "application/json",
                "relay-callback-url": callback_url,
                "idempotency-key": "order-42",
            },
        )


def logged(log: Path) -> str:
    return log.read_text(errors="replace")


async def killed_at(
    failpoint: str, db_url: str, upstream_url: str, key: str, callback_url: str, log: Path
) -> None:
    """Send the create to a relay that dies at `failpoint`: the client gets no answer."""
    env = relay_env(db_url, upstream_url, RELAY_FAILPOINT=failpoint)
    async with relay_process(env, log) as (proc, base_url):
        with pytest.raises(httpx.TransportError):
            await send(base_url, key, callback_url)
        async with asyncio.timeout(15):
            assert await proc.wait() == -9, log_tail(log)
    assert f"failpoint {failpoint}" in logged(log)


async def creates(sim: httpx.AsyncClient) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = (await sim.get("/_fake/creates")).json()["items"]
    return items


async def test_killed_after_the_commit_the_retry_gets_the_answer_and_the_callback(
    db_url: str, upstream: tuple[FakeUpstream, str], receiver: Receiver, tmp_path: Path
) -> None:
    """Killed between the commit and the answer: after a restart the retry gets the first
    answer (one upstream create), and the generation is polled and its callback delivered."""
    upstream_url = upstream[1]
    key = (await new_key(db_url)).api_key
    log = tmp_path / "relay.log"
    callback_url = f"{receiver.url}/hook"
    async with reset(upstream_url) as sim:
        await killed_at("proxy.after_commit", db_url, upstream_url, key, callback_url, log)
        (created,) = await creates(sim)
        async with relay_process(relay_env(db_url, upstream_url), log) as (_, base_url):
            retried = await send(base_url, key, callback_url)
            assert retried.status_code == 200, retried.text
            assert retried.headers["idempotent-replayed"] == "true"
            assert retried.json()["id"] == created["id"]
            assert len(await creates(sim)) == 1
            finished = await sim.post(f"/_fake/generations/{created['id']}/finish")
            assert finished.status_code == 200, finished.text
            await wait_for(lambda: receiver.on("/hook"), timeout_s=30)
            hook = receiver.on("/hook")[0]
            assert hook.headers["relay-subscription-id"] == retried.headers["relay-subscription-id"]
            assert orjson.loads(hook.body)["id"] == created["id"]


async def test_killed_before_the_commit_the_retry_is_told_and_nothing_is_created_again(
    db_url: str, upstream: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    """Killed between the upstream's answer and the commit: the generation exists upstream
    but the relay never recorded it. After a restart the retry gets 409
    idempotency_outcome_unknown, logged as an error, and the upstream sees no second create."""
    upstream_url = upstream[1]
    key = (await new_key(db_url)).api_key
    log = tmp_path / "relay.log"
    async with reset(upstream_url) as sim:
        hook = "http://127.0.0.1:9/hook"
        await killed_at("proxy.before_commit", db_url, upstream_url, key, hook, log)
        assert len(await creates(sim)) == 1
        async with relay_process(relay_env(db_url, upstream_url), log) as (_, base_url):
            for _ in range(2):
                retried = await send(base_url, key, hook)
                expect_error(retried, 409, "idempotency_outcome_unknown")
        assert len(await creates(sim)) == 1
    assert "ERROR relay.proxy Idempotency-Key of key" in logged(log)
