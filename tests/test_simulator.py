"""The upstream simulator over real HTTP: lifecycles, bodies, auth, faults and counters."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import orjson
import pytest

from relay.simulator import (
    FakeUpstream,
    FakeUpstreamConfig,
    FaultSettings,
    InvalidSpec,
    family_for_model,
)
from tests.helpers import serve_in_thread
from tests.simulator_support import (
    KEY,
    TIME_SCALE,
    create,
    poll_json,
    reset_client,
    serve_simulator,
    set_faults,
    statuses_until_final,
)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_simulator() as (_, url):
        yield url


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with reset_client(base_url) as http:
        yield http


# -- lifecycle -----------------------------------------------------------------------------------


async def test_explicit_durations_move_through_statuses_unscaled(
    client: httpx.AsyncClient,
) -> None:
    """Explicit queue_s/run_s are real seconds: IN_QUEUE, then IN_PROGRESS, then final."""
    created = await create(client, family="video", queue_s=0.2, run_s=0.2, final_status="COMPLETED")
    assert created["final_at"] == pytest.approx(time.time() + 0.4, abs=0.1)
    seen = await statuses_until_final(client, created["id"])
    assert seen == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    assert time.time() >= created["final_at"]


async def test_final_at_s_shorthand_splits_queue_and_run(client: httpx.AsyncClient) -> None:
    """final_at_s alone gives a fifth to the queue and the rest to the run."""
    created = await create(client, family="image", final_at_s=1.0)
    assert created["started_at"] == pytest.approx(created["final_at"] - 0.8, abs=1e-6)


async def test_drawn_durations_are_scaled_and_follow_the_model_family(
    client: httpx.AsyncClient,
) -> None:
    """POST /v1/generation/{provider}/{model} answers IN_QUEUE; drawn durations times time_scale."""
    started = time.time()
    answer = await client.post("/v1/generation/openai/sora-2", json={"prompt": "a cat"})
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "IN_QUEUE"
    assert body["input"] == {"prompt": "a cat"}
    assert body["data"] is None
    assert set(body) == {"id", "status", "input", "data", "usage"}
    polls = (await client.get(f"/_fake/generations/{body['id']}/polls")).json()
    assert 60 * TIME_SCALE <= polls["final_at"] - started <= 300 * TIME_SCALE + 0.05
    seen = await statuses_until_final(client, body["id"])
    assert seen[-1] in ("COMPLETED", "FAILED", "CANCELED")


def test_family_is_guessed_from_the_model_path() -> None:
    """Video names win, then speech names; anything else is an image model."""
    assert family_for_model("kling-ai/o3/video") == "video"
    assert family_for_model("google/veo3.1") == "video"
    assert family_for_model("minimax/speech-2.8-hd") == "speech"
    assert family_for_model("qwen/qwen3-tts") == "speech"
    assert family_for_model("google/nano-banana") == "image"


def test_same_seed_draws_the_same_ids_and_lifecycles() -> None:
    """Two simulators with one seed create identical ids, durations and outcomes."""
    first, second = (FakeUpstream(FakeUpstreamConfig(seed=42)) for _ in range(2))
    for family in ("video", "image", "speech", "video"):
        a, b = first.add_generation(family), second.add_generation(family)
        assert a.id == b.id
        assert a.final_status == b.final_status
        assert a.final_mono - a.created_mono == pytest.approx(b.final_mono - b.created_mono)


# -- bodies --------------------------------------------------------------------------------------


async def test_completed_image_body_has_the_documented_shape(client: httpx.AsyncClient) -> None:
    """A COMPLETED image carries data.images/data.image, usage, and an unknown extra field."""
    created = await create(
        client,
        family="image",
        final_at_s=0,
        final_status="COMPLETED",
        input={"prompt": "a cat", "resolution": "512x768", "n": 2},
    )
    body = await poll_json(client, created["id"])
    assert set(body) == {"id", "status", "input", "data", "usage", "provider_meta"}
    assert body["status"] == "COMPLETED"
    data = body["data"]
    assert data["type"] == "image"
    assert data["n"] == 2
    assert data["actual_prompt"] == "a cat"
    assert data["image"] == data["images"][0]
    assert set(data["image"]) == {"url", "file_name", "content_type", "width", "height"}
    assert (data["image"]["width"], data["image"]["height"]) == (512, 768)
    assert body["usage"] == {"total": 40, "subscription": 40, "permanent": 0}
    assert body["provider_meta"]["final_at"] == pytest.approx(created["final_at"])


async def test_failed_body_has_code_and_message_and_no_data(client: httpx.AsyncClient) -> None:
    """FAILED bodies carry code and message; CANCELED and in-flight bodies carry neither."""
    failed = await create(client, family="video", final_at_s=0, final_status="FAILED")
    body = await poll_json(client, failed["id"])
    assert body["status"] == "FAILED"
    assert body["data"] is None
    assert body["code"].startswith("VIDEO_GENERATION_")
    assert isinstance(body["message"], str) and body["message"]
    custom = await create(
        client, family="speech", final_at_s=0, final_status="FAILED", code="X", message="why"
    )
    body = await poll_json(client, custom["id"])
    assert (body["code"], body["message"]) == ("X", "why")
    canceled = await create(client, family="speech", final_at_s=0, final_status="CANCELED")
    body = await poll_json(client, canceled["id"])
    assert body["status"] == "CANCELED"
    assert "code" not in body and "message" not in body
    running = await create(client, family="video", queue_s=0, run_s=60, final_status="FAILED")
    body = await poll_json(client, running["id"])
    assert body["status"] == "IN_PROGRESS"
    assert "code" not in body and "provider_meta" not in body


async def test_legacy_status_uses_the_old_vocabulary(client: httpx.AsyncClient) -> None:
    """legacy_status reports starting/processing/succeeded (and failed) in lower case."""
    created = await create(
        client,
        family="speech",
        queue_s=0.15,
        run_s=0.15,
        final_status="COMPLETED",
        legacy_status=True,
    )
    assert await statuses_until_final(client, created["id"]) == [
        "starting",
        "processing",
        "succeeded",
    ]
    failed = await create(
        client, family="speech", final_at_s=0, final_status="FAILED", legacy_status=True
    )
    assert (await poll_json(client, failed["id"]))["status"] == "failed"
    polls = (await client.get(f"/_fake/generations/{failed['id']}/polls")).json()
    assert polls["status"] == "FAILED"


# -- auth and unknown ids ------------------------------------------------------------------------


async def test_missing_or_wrong_bearer_gets_401(client: httpx.AsyncClient) -> None:
    """Polls without the configured bearer key get 401 in the upstream's error shape."""
    created = await create(client, family="image")
    path = f"/v1/generation/{created['id']}"
    for headers in (
        {"authorization": ""},
        {"authorization": "Bearer wrong"},
        {"authorization": f"Basic {KEY}"},
    ):
        answer = await client.get(path, headers=headers)
        assert answer.status_code == 401
        assert answer.json() == {
            "error": "unauthorized",
            "code": "UNAUTHORIZED",
            "message": "Missing or invalid API key.",
        }
    assert (await client.get(path, headers={"authorization": f"bearer {KEY}"})).status_code == 200
    stats = (await client.get("/_fake/stats")).json()
    assert stats["polls"] == 4
    assert stats["by_status_code"] == {"200": 1, "401": 3}


async def test_auth_mode_403_refuses_every_upstream_request(client: httpx.AsyncClient) -> None:
    """auth_mode "403" answers polls and creates 403 even with the right key, until reset."""
    created = await create(client, family="image")
    await set_faults(client, auth_mode="403")
    poll = await client.get(f"/v1/generation/{created['id']}")
    assert poll.status_code == 403
    assert poll.json()["code"] == "FORBIDDEN"
    assert (await client.post("/v1/generation/a/b", json={})).status_code == 403
    await set_faults(client, auth_mode="401")
    assert (await client.get(f"/v1/generation/{created['id']}")).status_code == 401
    await set_faults(client, auth_mode="ok")
    assert (await client.get(f"/v1/generation/{created['id']}")).status_code == 200


async def test_any_bearer_is_accepted_when_no_key_is_configured() -> None:
    """With api_key None any non-empty bearer token passes; a missing one is still 401."""
    upstream = FakeUpstream(FakeUpstreamConfig(api_key=None))
    gen = upstream.add_generation("image", final_at_s=0)
    with serve_in_thread(upstream.app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            path = f"/v1/generation/{gen.id}"
            ok = await http.get(path, headers={"authorization": "Bearer anything"})
            assert ok.status_code == 200
            assert (await http.get(path)).status_code == 401
            assert (await http.get(path, headers={"authorization": "Bearer"})).status_code == 401


async def test_unknown_id_is_404_and_counted(client: httpx.AsyncClient) -> None:
    """An unknown id gets the upstream's 404 body, and its polls are counted all the same."""
    for _ in range(2):
        answer = await client.get("/v1/generation/gen_nope")
        assert answer.status_code == 404
        assert set(answer.json()) == {"error", "code", "message"}
    polls = (await client.get("/_fake/generations/gen_nope/polls")).json()
    assert polls["count"] == 2
    assert polls["status"] is None and polls["final_at"] is None
    stats = (await client.get("/_fake/stats")).json()
    assert stats["unknown_id_polls"] == 2
    assert stats["by_status_code"] == {"404": 2}


async def test_not_found_for_s_hides_a_new_generation(client: httpx.AsyncClient) -> None:
    """not_found_for_s answers 404 for that long after creation, then the generation."""
    created = await create(client, family="video", not_found_for_s=0.2, final_at_s=60)
    assert (await client.get(f"/v1/generation/{created['id']}")).status_code == 404
    await asyncio.sleep(0.25)
    assert (await poll_json(client, created["id"]))["status"] == "IN_QUEUE"


# -- faults --------------------------------------------------------------------------------------


async def test_error_rate_answers_5xx_and_counts_them(client: httpx.AsyncClient) -> None:
    """error_rate 1 answers every poll 500, 502 (HTML, like a proxy) or 503."""
    created = await create(client, family="image", final_at_s=0)
    await set_faults(client, error_rate=1.0)
    codes = set()
    for _ in range(30):
        answer = await client.get(f"/v1/generation/{created['id']}")
        codes.add(answer.status_code)
        if answer.status_code == 502:
            assert answer.headers["content-type"].startswith("text/html")
        else:
            assert set(answer.json()) == {"error", "code", "message"}
    assert codes <= {500, 502, 503} and len(codes) > 1
    stats = (await client.get("/_fake/stats")).json()
    assert stats["polls"] == 30
    assert stats["faults"]["error"] == 30


async def test_rate_limit_sends_retry_after_as_configured(client: httpx.AsyncClient) -> None:
    """rate_limit_rate 1 answers 429 with Retry-After: whole, fractional, or absent."""
    created = await create(client, family="image", final_at_s=0)
    path = f"/v1/generation/{created['id']}"
    for retry_after_s, header in ((2, "2"), (0.5, "0.5"), (None, None)):
        await set_faults(client, rate_limit_rate=1.0, retry_after_s=retry_after_s)
        answer = await client.get(path)
        assert answer.status_code == 429
        assert answer.json()["code"] == "RATE_LIMITED"
        assert answer.headers.get("retry-after") == header


async def test_latency_delays_every_poll(client: httpx.AsyncClient) -> None:
    """latency_s is added to each poll."""
    created = await create(client, family="image", final_at_s=0)
    await set_faults(client, latency_s=0.2)
    started = time.monotonic()
    await poll_json(client, created["id"])
    assert time.monotonic() - started >= 0.2


async def test_malformed_answers_are_200_without_a_json_object(client: httpx.AsyncClient) -> None:
    """malformed_rate 1 answers 200 with invalid JSON or JSON that is not an object."""
    created = await create(client, family="image", final_at_s=0)
    await set_faults(client, malformed_rate=1.0)
    for _ in range(20):
        answer = await client.get(f"/v1/generation/{created['id']}")
        assert answer.status_code == 200
        try:
            parsed = orjson.loads(answer.content)
        except orjson.JSONDecodeError:
            continue
        assert not isinstance(parsed, dict)
    assert (await client.get("/_fake/stats")).json()["faults"]["malformed"] == 20


async def test_hang_outlasts_a_short_client_timeout(client: httpx.AsyncClient) -> None:
    """hang_rate 1 holds the poll past the client's timeout; the poll is still counted."""
    created = await create(client, family="image", final_at_s=0)
    await set_faults(client, hang_rate=1.0)
    with pytest.raises(httpx.ReadTimeout):
        await client.get(f"/v1/generation/{created['id']}", timeout=0.2)
    polls = (await client.get(f"/_fake/generations/{created['id']}/polls")).json()
    assert polls["count"] == 1
    assert (await client.get("/_fake/stats")).json()["faults"]["hang"] == 1


async def test_a_short_hang_then_answers_normally(client: httpx.AsyncClient) -> None:
    """With a short hang_s the held poll is answered after it, with the current body."""
    created = await create(client, family="image", final_at_s=0)
    await set_faults(client, hang_rate=1.0, hang_s=0.2)
    started = time.monotonic()
    body = await poll_json(client, created["id"])
    assert time.monotonic() - started >= 0.2
    assert body["id"] == created["id"]


async def test_reset_releases_hung_polls(client: httpx.AsyncClient) -> None:
    """POST /_fake/reset lets a poll held by a hang answer at once."""
    created = await create(client, family="image", final_at_s=0)
    await set_faults(client, hang_rate=1.0)
    held = asyncio.create_task(client.get(f"/v1/generation/{created['id']}"))
    await asyncio.sleep(0.1)
    assert not held.done()
    await client.post("/_fake/reset", json={"faults": True})
    async with asyncio.timeout(2):
        answer = await held
    assert answer.status_code == 200


async def test_per_generation_faults_override_the_global_ones(client: httpx.AsyncClient) -> None:
    """faults in a create spec apply to that id only, on top of the global settings."""
    faulty = await create(client, family="image", final_at_s=0, faults={"rate_limit_rate": 1.0})
    healthy = await create(client, family="image", final_at_s=0)
    assert (await client.get(f"/v1/generation/{faulty['id']}")).status_code == 429
    assert (await client.get(f"/v1/generation/{healthy['id']}")).status_code == 200
    await set_faults(client, latency_s=0.15)
    started = time.monotonic()
    assert (await client.get(f"/v1/generation/{faulty['id']}")).status_code == 429
    assert time.monotonic() - started >= 0.15


async def test_fault_settings_are_validated(client: httpx.AsyncClient) -> None:
    """PUT /_fake/faults rejects unknown keys and out-of-range values, and keeps the old ones."""
    await set_faults(client, error_rate=0.25)
    for bad in (
        {"error_rate": 1.5},
        {"nope": 1},
        {"auth_mode": "500"},
        {"latency_s": -1},
        {"hang_rate": 0.5, "malformed_rate": 0.6},
        {"error_rate": True},
    ):
        assert (await client.put("/_fake/faults", json=bad)).status_code == 400
    current = (await client.get("/_fake/faults")).json()
    assert current == {**FaultSettings().to_json(), "error_rate": 0.25}


# -- counters and control API --------------------------------------------------------------------


async def test_polls_are_recorded_with_their_times(client: httpx.AsyncClient) -> None:
    """Every poll of an id is counted with its wall-clock time, faulted polls included."""
    created = await create(client, family="video", final_at_s=60)
    before = time.time()
    await poll_json(client, created["id"])
    await set_faults(client, error_rate=1.0)
    await client.get(f"/v1/generation/{created['id']}")
    await set_faults(client, error_rate=0.0)
    await poll_json(client, created["id"])
    after = time.time()
    polls = (await client.get(f"/_fake/generations/{created['id']}/polls")).json()
    assert polls["id"] == created["id"]
    assert polls["count"] == 3
    assert polls["times"] == sorted(polls["times"])
    assert before <= polls["times"][0] and polls["times"][-1] <= after
    assert polls["status"] == "IN_QUEUE"
    assert polls["final_at"] == pytest.approx(created["final_at"])


async def test_stats_count_polls_codes_and_generations(client: httpx.AsyncClient) -> None:
    """GET /_fake/stats totals polls, answers by status code and generations by status."""
    done = await create(client, family="image", final_at_s=0, final_status="COMPLETED")
    await create(client, family="video", final_at_s=60)
    await poll_json(client, done["id"])
    await client.get("/v1/generation/gen_missing")
    stats = (await client.get("/_fake/stats")).json()
    assert stats["polls"] == 2
    assert stats["by_status_code"] == {"200": 1, "404": 1}
    assert stats["generations"] == {
        "total": 2,
        "IN_QUEUE": 1,
        "IN_PROGRESS": 0,
        "COMPLETED": 1,
        "FAILED": 0,
        "CANCELED": 0,
    }


async def test_reset_clears_counters_and_optionally_generations(
    client: httpx.AsyncClient,
) -> None:
    """Reset always clears counters; generations go only when asked."""
    created = await create(client, family="image", final_at_s=0)
    await poll_json(client, created["id"])
    await client.post("/_fake/reset")
    assert (await client.get("/_fake/stats")).json()["polls"] == 0
    await poll_json(client, created["id"])
    await client.post("/_fake/reset", json={"generations": True})
    assert (await client.get(f"/v1/generation/{created['id']}")).status_code == 404


async def test_bulk_create_is_all_or_nothing(client: httpx.AsyncClient) -> None:
    """Bulk creation returns one entry per item, or creates nothing when one item is bad."""
    items = [{"family": "speech", "final_at_s": 0}] * 500 + [{"family": "video", "id": "mine"}]
    answer = await client.post("/_fake/generations/bulk", json={"items": items})
    assert answer.status_code == 201
    created = answer.json()["items"]
    assert len({item["id"] for item in created}) == 501
    assert created[-1]["id"] == "mine"
    assert (await poll_json(client, created[0]["id"]))["status"] in ("COMPLETED", "FAILED")
    bad = [{"family": "image"}, {"family": "image", "id": "mine"}]
    assert (await client.post("/_fake/generations/bulk", json={"items": bad})).status_code == 409
    bad = [{"family": "image"}, {"family": "image", "queue_s": "soon"}]
    assert (await client.post("/_fake/generations/bulk", json={"items": bad})).status_code == 400
    stats = (await client.get("/_fake/stats")).json()
    assert stats["generations"]["total"] == 501


async def test_finish_makes_a_generation_final_now(client: httpx.AsyncClient) -> None:
    """finish turns a running generation final at once and reports its body and time."""
    created = await create(client, family="video", final_at_s=600, final_status="COMPLETED")
    before = time.time()
    answer = await client.post(
        f"/_fake/generations/{created['id']}/finish", json={"status": "FAILED"}
    )
    assert answer.status_code == 200
    finished = answer.json()
    assert before <= finished["final_at"] <= time.time()
    assert finished["status"] == "FAILED"
    body = await poll_json(client, created["id"])
    assert body == finished["body"]
    assert body["status"] == "FAILED" and body["code"] and body["message"]
    again = await client.post(
        f"/_fake/generations/{created['id']}/finish", json={"status": "FAILED"}
    )
    assert again.json()["final_at"] == finished["final_at"]
    same = await client.post(f"/_fake/generations/{created['id']}/finish", json={})
    assert same.status_code == 200  # no status: keep the one it has
    other = await client.post(
        f"/_fake/generations/{created['id']}/finish", json={"status": "COMPLETED"}
    )
    assert other.status_code == 409
    missing = await client.post("/_fake/generations/gen_nope/finish")
    assert missing.status_code == 404


async def test_control_create_rejects_bad_specs(client: httpx.AsyncClient) -> None:
    """Unknown keys, bad families, conflicting durations and duplicate ids are refused."""
    await create(client, family="image", id="taken")
    for spec, status in (
        ({"family": "image", "colour": "red"}, 400),
        ({"family": "sound"}, 400),
        ({"family": "image", "final_at_s": 1, "run_s": 1}, 400),
        ({"family": "image", "final_status": "DONE"}, 400),
        ({"family": "image", "faults": {"error_rate": 2}}, 400),
        ({"family": "image", "id": "a/b"}, 400),
        ({"family": "image", "id": "taken"}, 409),
    ):
        answer = await client.post("/_fake/generations", json=spec)
        assert answer.status_code == status, spec
        assert set(answer.json()) == {"error", "message"}
    assert (await client.post("/_fake/generations", content=b"{")).status_code == 400


async def test_upstream_create_rejects_a_non_object_body(client: httpx.AsyncClient) -> None:
    """POST /v1/generation/... with a body that is not a JSON object is a 400 INVALID_INPUT."""
    answer = await client.post("/v1/generation/openai/gpt-image-1", content=b"[1]")
    assert answer.status_code == 400
    assert answer.json()["code"] == "INVALID_INPUT"


# -- configuration -------------------------------------------------------------------------------


def test_config_from_env_reads_the_three_variables() -> None:
    """RELAY_FAKE_API_KEY, RELAY_FAKE_SEED and RELAY_FAKE_TIME_SCALE are read; empty is unset."""
    config = FakeUpstreamConfig.from_env(
        {"RELAY_FAKE_API_KEY": "k", "RELAY_FAKE_SEED": "9", "RELAY_FAKE_TIME_SCALE": "0.01"}
    )
    assert (config.api_key, config.seed, config.time_scale) == ("k", 9, 0.01)
    defaults = FakeUpstreamConfig.from_env({"RELAY_FAKE_API_KEY": ""})
    assert (defaults.api_key, defaults.seed, defaults.time_scale) == (None, 0, 1.0)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RELAY_FAKE_SEED", "x"),
        ("RELAY_FAKE_SEED", "1.5"),
        ("RELAY_FAKE_TIME_SCALE", "fast"),
        ("RELAY_FAKE_TIME_SCALE", "-1"),
        ("RELAY_FAKE_TIME_SCALE", "nan"),
    ],
)
def test_config_from_env_names_a_bad_variable(name: str, value: str) -> None:
    """A bad value raises ValueError naming the variable."""
    with pytest.raises(ValueError, match=name):
        FakeUpstreamConfig.from_env({name: value})


def test_in_process_spec_errors_are_invalid_spec() -> None:
    """add_generation raises InvalidSpec (a ValueError) for a bad spec."""
    upstream = FakeUpstream()
    with pytest.raises(InvalidSpec):
        upstream.add_generation("image", queue_s=-1)
    upstream.add_generation("image", id="x")
    with pytest.raises(InvalidSpec):
        upstream.add_generation("image", id="x")
