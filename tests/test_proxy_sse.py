"""Creates through the relay with RELAY_UPSTREAM_SSE=true, over real HTTP against the
simulator's streaming create, on SQLite and PostgreSQL: the client's answer is the first
event, the stream is followed instead of polling, and polling takes over when a stream is
lost or its follower dies.

The simulator counts every poll of every id with its time: "no polls before the final GET"
is checked there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select

from relay.database import Database
from relay.eventstream import EventParser
from relay.models import generations
from relay.simulator import FakeUpstream
from relay.streams import is_final_event
from tests.apiclient import expect_error
from tests.helpers import Receiver, log_tail, new_key, relay_process, serve_env, wait_for
from tests.proxy_support import Rig, rig, simulator

VIDEO = "/v1/generation/kling-ai/o3/video"  # a video: 0.6-3 s at the simulator's time scale


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[FakeUpstream, str]]:
    with simulator(time_scale=0.01) as served:
        yield served


async def polls(proxy: Rig, gen_id: str) -> dict[str, Any]:
    answer = await proxy.upstream.get(f"/_fake/generations/{gen_id}/polls")
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


# --- The SSE framing (pure) -------------------------------------------------------------------


def test_events_are_data_lines_up_to_a_blank_line() -> None:
    """Data lines join with newlines; comments, other fields and a data-less event are
    skipped; CRLF and a missing space after the colon are both read."""
    parser = EventParser()
    lines = [b": keep-alive\n", b"event: status\n", b'data: {"a":\n', b"data:1}\r\n", b"\n"]
    assert [parser.feed(line) for line in lines] == [None, None, None, None, b'{"a":\n1}']
    assert parser.feed(b"id: 7\n") is None
    assert parser.feed(b"\n") is None


@pytest.mark.parametrize(
    ("data", "final"),
    [
        (b'{"id": "g", "status": "COMPLETED"}', True),
        (b'{"id": "g", "status": "succeeded"}', True),
        (b'{"id": "g", "status": "canceled"}', True),
        (b'{"id": "g", "status": "IN_PROGRESS"}', False),
        (b'{"id": "g"}', False),
        (b"[1]", False),
        (b"not json", False),
    ],
)
def test_a_final_event_is_one_with_a_final_status(data: bytes, final: bool) -> None:
    """Statuses are read as polls read them (case, old words); anything else is not final."""
    assert is_final_event(data) is final


# --- Over HTTP ------------------------------------------------------------------------------


async def test_the_answer_is_the_first_event_and_no_poll_comes_before_the_final_get(
    db_url: str, upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """The client gets the first event's object as JSON with the upstream's status; the
    stream is followed (its lease renewed well past RELAY_LEASE), so the generation is polled
    once, after it is final, and that GET's body is what the callback carries."""
    async with rig(
        db_url,
        upstream[1],
        role="all",
        allow_private_callbacks=True,
        upstream_sse=True,
        lease_s=0.5,
    ) as proxy:
        answer = await proxy.create(path=VIDEO, callback_url=f"{receiver.url}/sse")
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/json"
        first = answer.json()
        assert set(first) == {"id", "status", "data", "usage"}
        assert first["status"] == "IN_QUEUE"
        assert answer.headers["relay-subscription-id"]
        (created,) = await proxy.upstream_creates()
        assert (created["sse"], created["path"]) == (True, "/v1/generation/sse/kling-ai/o3/video")
        await wait_for(lambda: receiver.on("/sse"), timeout_s=20)
        seen = await polls(proxy, first["id"])
        assert seen["count"] == 1, seen
        assert seen["times"][0] >= seen["final_at"]
        delivered = orjson.loads(receiver.on("/sse")[0].body)
        assert delivered["id"] == first["id"]
        assert "input" in delivered  # the GET's body, not an event's subset


async def test_a_lost_stream_falls_back_to_polling(
    db_url: str, upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """A stream cut after its first event hands the generation back to polling at once: it
    is polled before it is final, and its callback still arrives."""
    async with rig(
        db_url, upstream[1], role="all", allow_private_callbacks=True, upstream_sse=True
    ) as proxy:
        await proxy.faults(sse_cut_after_frames=1)
        answer = await proxy.create(path=VIDEO, callback_url=f"{receiver.url}/cut")
        assert answer.status_code == 200, answer.text
        gen_id = answer.json()["id"]
        await wait_for(lambda: receiver.on("/cut"), timeout_s=20)
        seen = await polls(proxy, gen_id)
        assert seen["count"] >= 2, seen
        assert seen["times"][0] < seen["final_at"]


async def test_streams_are_handed_back_to_polling_at_shutdown(
    db_url: str, upstream: tuple[FakeUpstream, str], db: Database
) -> None:
    """While a stream is followed its generation is not due; when the process stops, the
    generation is due at once (no lease left to run out)."""
    async with rig(db_url, upstream[1], upstream_sse=True) as proxy:
        answer = await proxy.create(path="/v1/generation/kling-ai/slow/video")
        gen_id = answer.json()["id"]

        async def row() -> Any:
            async with db.reader() as conn:
                query = select(generations.c.next_poll_at, generations.c.lease_owner)
                return (await conn.execute(query.where(generations.c.id == gen_id))).one()

        leased = await row()
        assert leased.lease_owner.endswith("/sse")
        assert leased.next_poll_at > db.now()
    released = await row()
    assert released.lease_owner is None
    assert released.next_poll_at <= db.now()


async def test_a_first_event_without_an_id_is_502(
    db_url: str, upstream: tuple[FakeUpstream, str]
) -> None:
    """The stream's first object has no id: 502 upstream_invalid_answer, no subscription."""
    async with rig(db_url, upstream[1], upstream_sse=True) as proxy:
        await proxy.faults(create_without_id=True)
        expect_error(await proxy.create(path=VIDEO), 502, "upstream_invalid_answer")
        assert await proxy.subscriptions() == []


async def test_refusals_of_the_streaming_create_pass_through(
    db_url: str, upstream: tuple[FakeUpstream, str]
) -> None:
    """A refusal is a JSON answer, not a stream: passed through verbatim, no subscription."""
    async with rig(db_url, upstream[1], upstream_sse=True) as proxy:
        await proxy.faults(create_refusal=402)
        answer = await proxy.create(path=VIDEO)
        assert answer.status_code == 402
        assert answer.json()["code"] == "INSUFFICIENT_CREDITS"
        assert await proxy.subscriptions() == []


async def test_when_the_follower_dies_polling_resumes(
    db_url: str, upstream: tuple[FakeUpstream, str], receiver: Receiver, tmp_path: Path
) -> None:
    """A relay killed (SIGKILL) while following a stream (no poll yet): its lease runs out,
    and the restarted relay polls the generation and delivers its callback."""
    upstream_url = upstream[1]
    key = (await new_key(db_url)).api_key
    log = tmp_path / "relay.log"
    env = serve_env(
        db_url,
        upstream_url,
        RELAY_POLL_MAX_INTERVAL="0.5",
        RELAY_LEASE="1",
        RELAY_UPSTREAM_SSE="true",
    )
    async with httpx.AsyncClient(base_url=upstream_url, timeout=10) as sim:
        await sim.post("/_fake/reset", json={"generations": True, "faults": True})
        async with relay_process(env, log) as (proc, base_url):
            async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
                answer = await client.post(
                    "/v1/generation/kling-ai/long/video",
                    content=b"{}",
                    headers={
                        "authorization": f"Bearer {key}",
                        "content-type": "application/json",
                        "relay-callback-url": f"{receiver.url}/died",
                    },
                )
            assert answer.status_code == 200, answer.text
            gen_id = answer.json()["id"]
            proc.kill()
            async with asyncio.timeout(15):
                await proc.wait()
        assert (await sim.get(f"/_fake/generations/{gen_id}/polls")).json()["count"] == 0
        async with relay_process({**env, "RELAY_UPSTREAM_SSE": "false"}, log):
            await wait_for(lambda: receiver.on("/died"), timeout_s=30)
    assert orjson.loads(receiver.on("/died")[0].body)["id"] == gen_id, log_tail(log)
