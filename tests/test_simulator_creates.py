"""The simulator's create surface over real HTTP: streamed JSON and multipart bodies, the log
of creates, refusals, latency, answers without an id, and SSE streams."""

from __future__ import annotations

import asyncio
import hashlib
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from tests.helpers import wait_for
from tests.simulator_support import set_faults, simulator_fixtures, stats

# Drawn lifecycles: images 50-300 ms, video 0.6-3 s.
served, client = simulator_fixtures(time_scale=0.01)


async def creates(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    answer = await client.get("/_fake/creates")
    assert answer.status_code == 200
    body = answer.json()
    assert body["total"] == len(body["items"])
    items: list[dict[str, Any]] = body["items"]
    return items


async def sse_frames(
    client: httpx.AsyncClient, path: str, timeout_s: float = 5.0, **kwargs: Any
) -> list[dict[str, Any]]:
    """POST to an SSE create and read every frame until the stream ends."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout_s), client.stream("POST", path, **kwargs) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        async for line in answer.aiter_lines():
            if line.startswith("data: "):
                frames.append(orjson.loads(line[6:]))
    return frames


async def test_json_creates_are_recorded_byte_exact(client: httpx.AsyncClient) -> None:
    """Each create is logged with its path, content type, byte count, sha256 and id."""
    raw = b'{"prompt": "a cat", "n": 2}'
    answer = await client.post(
        "/v1/generation/flux/dev", content=raw, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 200
    body = answer.json()
    assert (body["status"], body["input"]) == ("IN_QUEUE", {"prompt": "a cat", "n": 2})
    (record,) = await creates(client)
    assert record["id"] == body["id"]
    assert record["path"] == "/v1/generation/flux/dev"
    assert record["content_type"] == "application/json"
    assert (record["bytes"], record["sha256"]) == (len(raw), hashlib.sha256(raw).hexdigest())
    assert (record["sse"], record["status"]) == (False, 200)
    assert record["at"] == pytest.approx(time.time(), abs=5)
    assert (await stats(client))["create_total"] == 1


async def test_a_50_mib_multipart_upload_is_streamed_not_held(client: httpx.AsyncClient) -> None:
    """A 50 MiB multipart body is hashed chunk by chunk: the log matches it byte for byte
    and the simulator never holds it whole."""
    boundary = "simulator-boundary"
    chunk = bytes(range(256)) * 4096  # 1 MiB
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    digest = hashlib.sha256()
    size = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal size
        for part in [head, *([chunk] * 50), tail]:
            digest.update(part)
            size += len(part)
            yield part

    tracemalloc.start()
    try:
        answer = await client.post(
            "/v1/generation/kling-ai/o3/video",
            content=body(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
            timeout=60,
        )
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert answer.status_code == 200, answer.text
    (record,) = await creates(client)
    assert (record["bytes"], record["sha256"]) == (size, digest.hexdigest())
    assert record["content_type"].startswith("multipart/form-data")
    assert record["id"] == answer.json()["id"]
    assert peak_bytes < 20 * 1024 * 1024  # the whole body would be 50 MiB


@pytest.mark.parametrize(
    ("refusal", "code"),
    [
        (402, "INSUFFICIENT_CREDITS"),
        (422, "CONTENT_REJECTED"),
        (429, "RATE_LIMITED"),
        (500, "INTERNAL_ERROR"),
    ],
)
async def test_refusals_answer_in_the_upstream_shape(
    client: httpx.AsyncClient, refusal: int, code: str
) -> None:
    """create_refusal answers that status with the upstream's error body and makes nothing."""
    await set_faults(client, create_refusal=refusal, retry_after_s=3)
    for path in ("/v1/generation/flux/dev", "/v1/generation/sse/flux/dev"):
        answer = await client.post(path, json={"prompt": "x"})
        assert answer.status_code == refusal
        assert answer.json()["code"] == code
        assert set(answer.json()) == {"error", "code", "message"}
        if refusal == 429:
            assert answer.headers["retry-after"] == "3"
    records = await creates(client)
    assert [(r["id"], r["status"], r["sse"]) for r in records] == [
        (None, refusal, False),
        (None, refusal, True),
    ]
    assert (await stats(client))["generations"]["total"] == 0
    assert (await client.put("/_fake/faults", json={"create_refusal": 404})).status_code == 400


async def test_non_object_json_is_400_and_bad_keys_are_401(client: httpx.AsyncClient) -> None:
    """A JSON body that is not an object is INVALID_INPUT; a wrong key is refused first."""
    answer = await client.post("/v1/generation/openai/gpt-image-1", content=b"[1]")
    assert (answer.status_code, answer.json()["code"]) == (400, "INVALID_INPUT")
    wrong = await client.post("/v1/generation/a/b", json={}, headers={"authorization": "Bearer x"})
    assert wrong.status_code == 401
    assert [r["status"] for r in await creates(client)] == [400]


async def test_create_latency_delays_creates_only(client: httpx.AsyncClient) -> None:
    """create_latency_s holds creates; polls answer at once."""
    await set_faults(client, create_latency_s=0.3)
    started = time.monotonic()
    created = (await client.post("/v1/generation/flux/dev", json={})).json()
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    assert (await client.get(f"/v1/generation/{created['id']}")).status_code == 200
    assert time.monotonic() - started < 0.3


async def test_an_answer_without_id(client: httpx.AsyncClient) -> None:
    """create_without_id answers 2xx with no id (plain and first SSE frame); the generation
    exists and the log names it."""
    await set_faults(client, create_without_id=True, sse_cut_after_frames=1)
    answer = await client.post("/v1/generation/flux/dev", json={"prompt": "x"})
    assert answer.status_code == 200
    assert "id" not in answer.json() and answer.json()["status"] == "IN_QUEUE"
    frames = await sse_frames(client, "/v1/generation/sse/flux/dev", json={})
    assert frames == [{"status": "IN_QUEUE", "data": None, "usage": frames[0]["usage"]}]
    records = await creates(client)
    assert all(r["id"] for r in records)
    assert (await stats(client))["generations"]["total"] == 2


async def test_sse_streams_each_status_until_final(client: httpx.AsyncClient) -> None:
    """The stream starts with IN_QUEUE at once, sends each change, and ends after the final."""
    frames = await sse_frames(client, "/v1/generation/sse/flux/dev", json={"prompt": "a cat"})
    statuses = [frame["status"] for frame in frames]
    assert statuses[0] == "IN_QUEUE"
    assert statuses[-1] in ("COMPLETED", "FAILED", "CANCELED")
    assert statuses in (
        ["IN_QUEUE", "IN_PROGRESS", statuses[-1]],
        ["IN_QUEUE", statuses[-1]],
    )
    assert all(set(frame) == {"id", "status", "data", "usage"} for frame in frames)
    assert len({frame["id"] for frame in frames}) == 1
    (record,) = await creates(client)
    assert (record["sse"], record["id"]) == (True, frames[0]["id"])
    polled = (await client.get(f"/v1/generation/{record['id']}")).json()
    assert polled["status"] == statuses[-1]
    assert polled["data"] == frames[-1]["data"]


async def test_finish_ends_an_open_stream(client: httpx.AsyncClient) -> None:
    """finish makes the stream send the final frame at once and end."""

    async def finish_soon() -> None:
        records: list[dict[str, Any]] = []
        while not records:
            await asyncio.sleep(0.02)
            records = await creates(client)
        await client.post(
            f"/_fake/generations/{records[0]['id']}/finish", json={"status": "FAILED"}
        )

    finisher = asyncio.create_task(finish_soon())
    started = time.monotonic()
    frames = await sse_frames(client, "/v1/generation/sse/google/veo3", json={})
    await finisher
    assert time.monotonic() - started < 0.5  # drawn video takes 0.6 s or more
    assert frames[-1]["status"] == "FAILED"
    assert frames[0]["status"] == "IN_QUEUE"


async def test_streams_can_be_cut(client: httpx.AsyncClient) -> None:
    """sse_cut_after_frames and sse_cut_after_s end streams early, without a final frame."""
    await set_faults(client, sse_cut_after_frames=1)
    frames = await sse_frames(client, "/v1/generation/sse/google/veo3", json={})
    assert [frame["status"] for frame in frames] == ["IN_QUEUE"]
    await set_faults(client, sse_cut_after_frames=None, sse_cut_after_s=0.2)
    started = time.monotonic()
    frames = await sse_frames(client, "/v1/generation/sse/google/veo3", json={})
    assert 0.2 <= time.monotonic() - started < 0.55
    assert frames[-1]["status"] in ("IN_QUEUE", "IN_PROGRESS")
    for bad in ({"sse_cut_after_frames": 0}, {"sse_cut_after_s": -1}, {"create_without_id": 1}):
        assert (await client.put("/_fake/faults", json=bad)).status_code == 400


async def test_many_open_streams_share_one_timer_heap(client: httpx.AsyncClient) -> None:
    """300 open streams cost one booked check per generation; reset ends them all."""
    opened: list[str] = []
    limits = httpx.Limits(max_connections=400)
    async with httpx.AsyncClient(
        base_url=str(client.base_url), headers=client.headers, limits=limits, timeout=20
    ) as many:

        async def one_stream() -> list[str]:
            statuses = []
            async with many.stream("POST", "/v1/generation/sse/google/veo3", json={}) as answer:
                async for line in answer.aiter_lines():
                    if line.startswith("data: "):
                        statuses.append(orjson.loads(line[6:])["status"])
                        if len(statuses) == 1:
                            opened.append(statuses[0])
            return statuses

        tasks = [asyncio.create_task(one_stream()) for _ in range(300)]
        await wait_for(lambda: len(opened) == 300, timeout_s=20)
        assert (await stats(many))["timers"] <= 300
        await many.post("/_fake/reset", json={"generations": True})
        async with asyncio.timeout(10):
            results = await asyncio.gather(*tasks)
    assert all(statuses[0] == "IN_QUEUE" for statuses in results)
