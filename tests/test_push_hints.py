"""Push hints end to end over real HTTP: the simulator's signed workspace webhooks (or hints
signed here with the independent `standardwebhooks` package) into a relay on loopback, on
SQLite and PostgreSQL.

A relay here polls slowly (RELAY_POLL_MIN_INTERVAL 5 s), so a final detected within a second
or two was detected by a hint, and the simulator's per-id poll counters show what the relay
asked for.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from standardwebhooks.webhooks import Webhook

from relay.app import create_app
from relay.simulator import FakeUpstream
from tests.delivery import wait_status
from tests.helpers import Receiver, fast_settings, new_key, serve_in_thread, wait_for

SECRET = "whsec_" + base64.b64encode(b"upstream workspace webhook secret").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"a secret the relay does not know").decode()
HOOK_PATH = "/v1/upstream/webhook"
SLOW_POLLS = {"poll_min_interval_s": 5.0, "poll_max_interval_s": 30.0, "sweep": "off"}


@dataclass
class Setup:
    sim: FakeUpstream
    sim_url: str
    relay_url: str
    api_key: str
    receiver: Receiver
    control: httpx.AsyncClient  # the simulator's control API
    client: httpx.AsyncClient  # the relay's API, with the key

    async def webhooks(self, **settings: Any) -> None:
        """Point the simulator's workspace webhooks at the relay, with these settings."""
        body = {"url": self.relay_url + HOOK_PATH, "secrets": [SECRET], **settings}
        response = await self.control.put("/_fake/webhooks", json=body)
        assert response.status_code == 200, response.text

    async def generation(self, **spec: Any) -> str:
        gen_id = f"gen_{uuid.uuid4().hex[:12]}"
        spec = {"id": gen_id, "family": "video", "queue_s": 0, "run_s": 3600, **spec}
        response = await self.control.post("/_fake/generations", json=spec)
        assert response.status_code == 201, response.text
        return gen_id

    async def finish(self, gen_id: str) -> float:
        response = await self.control.post(f"/_fake/generations/{gen_id}/finish")
        assert response.status_code == 200, response.text
        return time.time()

    async def subscribe(self, gen_id: str, path: str = "/hook") -> dict[str, Any]:
        response = await self.client.post(
            "/v1/subscriptions",
            json={"generation_id": gen_id, "callback_url": self.receiver.url + path},
        )
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created

    async def subscription(self, sub_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/v1/subscriptions/{sub_id}")
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()
        return found

    async def readiness(self) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.relay_url, timeout=5) as probe:
            body: dict[str, Any] = (await probe.get("/readyz")).json()
            return body

    async def hint(self, payload: dict[str, Any], **overrides: Any) -> httpx.Response:
        """POST a hint signed here (independently of the relay and the simulator)."""
        body = orjson.dumps(payload)
        msg_id = overrides.pop("msg_id", f"msg_{uuid.uuid4().hex}")
        headers = signed(overrides.pop("secret", SECRET), msg_id, body, **overrides)
        async with httpx.AsyncClient(base_url=self.relay_url, timeout=5) as sender:
            return await sender.post(HOOK_PATH, content=body, headers=headers)

    def polls(self, gen_id: str) -> int:
        return self.sim.poll_count(gen_id)


def signed(secret: str, msg_id: str, body: bytes, at: float | None = None) -> dict[str, str]:
    timestamp = datetime.fromtimestamp(time.time() if at is None else at, UTC)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, timestamp, body.decode()),
    }


def completed(gen_id: str) -> dict[str, Any]:
    return {"type": "task.completed", "data": {"prediction": {"id": gen_id, "state": "succeeded"}}}


@contextlib.asynccontextmanager
async def relay_with_hints(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver, **changes: Any
) -> AsyncIterator[Setup]:
    sim, sim_url = fake_upstream
    settings = fast_settings(
        db_url, sim_url, **{"upstream_webhook_secrets": (SECRET,), **SLOW_POLLS, **changes}
    )
    key = await new_key(db_url)
    with serve_in_thread(create_app(settings)) as relay_url:
        async with (
            httpx.AsyncClient(base_url=sim_url, timeout=10) as control,
            httpx.AsyncClient(
                base_url=relay_url,
                headers={"authorization": f"Bearer {key.api_key}"},
                timeout=10,
            ) as client,
        ):
            yield Setup(sim, sim_url, relay_url, key.api_key, receiver, control, client)
            await control.put("/_fake/webhooks", json={"url": None})


async def test_a_terminal_hint_delivers_within_a_second_or_two_with_one_get(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """A generation hints reached is not polled; its completion hint makes the relay fetch it
    once and deliver, in well under the 5 s the shortest poll gap would take."""
    async with relay_with_hints(db_url, fake_upstream, receiver) as s:
        await s.webhooks()
        gen_id = await s.generation()
        # task.created and task.started reach the relay before the subscription, which
        # then starts from what they said: no first poll.
        await wait_for(lambda: s.sim.webhooks.stats()["delivered"] >= 2)
        sub = await s.subscribe(gen_id)
        assert sub["generation_status"] == "IN_PROGRESS"
        await _settle(0.5)
        assert s.polls(gen_id) == 0
        finished_at = await s.finish(gen_id)
        callback = (await wait_for(lambda: s.receiver.on("/hook"), timeout_s=10))[0]
        assert callback.at - finished_at < 2.5
        assert s.polls(gen_id) == 1  # the one GET that fetched the final body
        body = orjson.loads(callback.body)
        assert body["id"] == gen_id and body["status"] == "COMPLETED" and "provider_meta" in body
        await wait_status(s.client, sub["id"], "delivered")  # recorded after the receiver answered
        assert (await s.readiness())["hints"] == "ok"


async def test_a_hint_before_the_subscription_is_remembered(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """A terminal hint for an id nobody watches yet makes the subscription that follows fetch
    it at once; an earlier hint gives it its status without any poll."""
    async with relay_with_hints(db_url, fake_upstream, receiver) as s:
        running, done = f"gen_{uuid.uuid4().hex[:8]}", f"gen_{uuid.uuid4().hex[:8]}"
        await s.control.post(
            "/_fake/generations", json={"id": running, "family": "video", "run_s": 3600}
        )
        await s.control.post(
            "/_fake/generations", json={"id": done, "family": "image", "run_s": 3600}
        )
        await s.finish(done)
        started = {"type": "task.started", "prediction": {"id": running, "state": "running"}}
        assert (await s.hint(started)).status_code == 204
        assert (await s.hint(completed(done))).status_code == 204

        watched = await s.subscribe(running)
        assert watched["generation_status"] == "IN_PROGRESS"
        late = await s.subscribe(done)
        await wait_for(_subscription_is(s, late["id"], "delivered"), timeout_s=5)
        assert s.polls(done) == 1
        await _settle()
        assert s.polls(running) == 0


async def _settle(seconds: float = 0.5) -> None:
    await asyncio.sleep(seconds)


async def test_forged_stale_and_replayed_hints_change_nothing(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """A wrong secret, a stale or future timestamp and missing headers get 401; a replayed
    webhook-id gets 204 and is ignored whatever its body."""
    async with relay_with_hints(db_url, fake_upstream, receiver) as s:
        gen_id = await s.generation()
        sub = await s.subscribe(gen_id)
        await wait_for(lambda: s.polls(gen_id) >= 1)  # the first poll (no hint flowed yet)
        polls = s.polls(gen_id)
        await s.finish(gen_id)

        forged = await s.hint(completed(gen_id), secret=OTHER_SECRET)
        stale = await s.hint(completed(gen_id), at=time.time() - 310)
        future = await s.hint(completed(gen_id), at=time.time() + 310)
        for refused in (forged, stale, future):
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "unauthorized"
        async with httpx.AsyncClient(base_url=s.relay_url, timeout=5) as raw:
            unsigned = await raw.post(HOOK_PATH, content=orjson.dumps(completed(gen_id)))
        assert unsigned.status_code == 401

        queued = {"type": "task.created", "prediction": {"id": gen_id, "state": "queued"}}
        assert (await s.hint(queued, msg_id="msg_replayed")).status_code == 204
        replay = await s.hint(completed(gen_id), msg_id="msg_replayed")
        assert replay.status_code == 204
        await _settle(1.0)
        assert s.polls(gen_id) == polls  # nothing made it due
        assert (await s.subscription(sub["id"]))["status"] == "active"

        assert (await s.hint(completed(gen_id))).status_code == 204
        await wait_for(lambda: s.receiver.on("/hook"), timeout_s=5)
        assert s.polls(gen_id) == polls + 1


async def test_lost_terminal_hints_are_caught_by_the_safety_net(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """With every terminal webhook lost, the hinted safety-net poll still delivers."""
    async with relay_with_hints(
        db_url,
        fake_upstream,
        receiver,
        poll_min_interval_s=0.2,
        poll_max_interval_s=1.0,
        hinted_poll_interval_s=2.0,
    ) as s:
        await s.webhooks(events=["task.created", "task.started"])
        gen_id = await s.generation(queue_s=0.2)
        await wait_for(lambda: s.sim.webhooks.stats()["delivered"] >= 2, timeout_s=5)
        subscribed_at = time.time()
        sub = await s.subscribe(gen_id)
        await _settle(2.5)  # one safety-net poll sees it still running
        await s.finish(gen_id)
        await wait_for(lambda: s.receiver.on("/hook"), timeout_s=10)
        await wait_status(s.client, sub["id"], "delivered")  # recorded after the receiver answered
        # Polled about every 2 s (the safety net), not every 0.2-1 s (the normal schedule).
        times = [subscribed_at, *s.sim.poll_times(gen_id)]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(gaps) >= 2 and min(gaps) > 1.5, gaps


async def test_duplicated_and_reordered_hints_deliver_each_subscription_once(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """Every webhook sent twice and out of order: one delivery per subscription, and a late
    earlier-stage hint never moves a generation back."""
    async with relay_with_hints(db_url, fake_upstream, receiver) as s:
        await s.webhooks(duplicate_rate=1.0, delay_jitter_s=0.4)
        gen_ids = [await s.generation() for _ in range(3)]
        subs = [
            await s.subscribe(g, f"/hook/{i}/{k}") for i, g in enumerate(gen_ids) for k in (0, 1)
        ]
        for gen_id in gen_ids:
            await s.finish(gen_id)
        await wait_for(lambda: len(s.receiver.received) >= len(subs), timeout_s=10)
        await _settle(1.5)  # duplicates and stragglers arrive meanwhile
        by_sub: dict[str, int] = {}
        for callback in s.receiver.received:
            sub_id = callback.headers["relay-subscription-id"]
            by_sub[sub_id] = by_sub.get(sub_id, 0) + 1
        assert by_sub == {sub["id"]: 1 for sub in subs}
        assert s.sim.webhooks.stats()["duplicated"] > 0

        gen_id = await s.generation()
        sub = await s.subscribe(gen_id)
        started = {"type": "task.started", "prediction": {"id": gen_id, "state": "running"}}
        created = {"type": "task.created", "prediction": {"id": gen_id, "state": "queued"}}
        assert (await s.hint(started)).status_code == 204
        assert (await s.hint(created)).status_code == 204
        assert (await s.subscription(sub["id"]))["generation_status"] == "IN_PROGRESS"


async def test_silence_brings_the_normal_schedule_back_and_readiness_says_so(
    db_url: str,
    fake_upstream: tuple[FakeUpstream, str],
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When hints stop for RELAY_HINT_SILENCE, /readyz says "silent", a warning is logged,
    and a hinted generation is polled again on the normal schedule."""
    caplog.set_level(logging.INFO, logger="relay.signals")
    async with relay_with_hints(
        db_url,
        fake_upstream,
        receiver,
        poll_min_interval_s=0.2,
        poll_max_interval_s=1.0,
        hint_silence_s=2.0,
    ) as s:
        assert (await s.readiness())["hints"] == "silent"  # none yet
        gen_id = await s.generation()
        started = {"type": "task.started", "prediction": {"id": gen_id, "state": "running"}}
        assert (await s.hint(started)).status_code == 204
        await s.subscribe(gen_id)
        assert (await s.readiness())["hints"] == "ok"
        await _settle(0.5)
        assert s.polls(gen_id) == 0  # the safety net is 300 s away
        await wait_for(_readiness_is(s, "silent"), timeout_s=6)
        await wait_for(lambda: s.polls(gen_id) >= 2, timeout_s=6)
        assert any("went silent" in r.getMessage() for r in caplog.records)


def _subscription_is(s: Setup, sub_id: str, status: str) -> Any:
    async def check() -> bool:
        return bool((await s.subscription(sub_id))["status"] == status)

    return check


def _readiness_is(s: Setup, hints: str) -> Any:
    async def check() -> bool:
        return bool((await s.readiness())["hints"] == hints)

    return check


async def test_the_intake_refuses_bad_requests_clearly(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """Signed but not JSON or not an object: 400; over 256 KiB: 413; no id: 204, ignored."""
    async with relay_with_hints(db_url, fake_upstream, receiver) as s:
        async with httpx.AsyncClient(base_url=s.relay_url, timeout=5) as raw:
            for body in (b"not json", b"[1, 2]"):
                headers = signed(SECRET, f"msg_{uuid.uuid4().hex}", body)
                answer = await raw.post(HOOK_PATH, content=body, headers=headers)
                assert answer.status_code == 400
                assert answer.json()["error"]["code"] == "invalid_json"
            huge = b'{"pad": "' + b"x" * (256 * 1024) + b'"}'
            answer = await raw.post(HOOK_PATH, content=huge, headers=signed(SECRET, "m", huge))
            assert answer.status_code == 413
        assert (await s.hint({"type": "task.completed"})).status_code == 204


async def test_without_a_secret_the_intake_does_not_exist(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """RELAY_UPSTREAM_WEBHOOK_SECRET unset: 404 for any webhook, /readyz says hints are off."""
    async with relay_with_hints(db_url, fake_upstream, receiver, upstream_webhook_secrets=()) as s:
        answer = await s.hint(completed("gen_1"))
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "not_found"
        assert (await s.readiness())["hints"] == "off"


@pytest.mark.parametrize("location", ["prediction.id", "data.id", "id", "data.task_id"])
async def test_every_id_location_the_simulator_sends_is_understood(
    db_url: str,
    fake_upstream: tuple[FakeUpstream, str],
    receiver: Receiver,
    location: str,
) -> None:
    """Wherever the payload puts the generation id, the completion hint delivers."""
    async with relay_with_hints(db_url, fake_upstream, receiver) as s:
        await s.webhooks(id_location=location)
        gen_id = await s.generation()
        await wait_for(lambda: s.sim.webhooks.stats()["delivered"] >= 1)
        await s.subscribe(gen_id)
        await s.finish(gen_id)
        await wait_for(lambda: s.receiver.on("/hook"), timeout_s=5)
        assert s.polls(gen_id) <= 1
