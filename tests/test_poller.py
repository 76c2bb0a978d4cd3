"""Polling end to end over real HTTP: relay on loopback against the upstream simulator, on
SQLite and PostgreSQL. Coalescing, the adaptive schedule, every upstream fault class, late
registration, cancelation, and a SIGKILL of a real `relay serve` process."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from sqlalchemy import text
from standardwebhooks.webhooks import Webhook

from relay.app import create_app
from relay.config import Settings
from relay.simulator import FakeUpstream, FinalStatus
from tests.helpers import (
    Receiver,
    fast_settings,
    new_key,
    open_test_database,
    relay_process,
    serve_env,
    serve_in_thread,
    wait_for,
)

FINAL_SUBSCRIPTION_STATUSES = {"delivered", "failed", "canceled", "expired"}
NOTICE_KEYS = {"id", "status", "input", "data", "usage", "code", "message"}


@dataclass
class Relay:
    """A running relay's API, seen through clients that remember every answer's status."""

    base_url: str
    answers: list[tuple[str, str, int]] = field(default_factory=list)
    _clients: dict[str, httpx.AsyncClient] = field(default_factory=dict)

    def client(self, api_key: str = "") -> httpx.AsyncClient:
        if api_key not in self._clients:

            async def remember(response: httpx.Response) -> None:
                request = response.request
                self.answers.append((request.method, request.url.path, response.status_code))

            headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
            self._clients[api_key] = httpx.AsyncClient(
                base_url=self.base_url,
                headers=headers,
                timeout=10,
                event_hooks={"response": [remember]},
            )
        return self._clients[api_key]

    async def subscribe(
        self, api_key: str, generation_id: str, callback_url: str
    ) -> dict[str, Any]:
        response = await self.client(api_key).post(
            "/v1/subscriptions",
            json={"generation_id": generation_id, "callback_url": callback_url},
        )
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created

    async def get(self, api_key: str, sub_id: str) -> dict[str, Any]:
        response = await self.client(api_key).get(f"/v1/subscriptions/{sub_id}")
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()
        return found

    async def statuses(self, subs: list[tuple[str, str]]) -> dict[str, str]:
        """{subscription id: status} for (api key, subscription id) pairs."""
        return {sub_id: (await self.get(key, sub_id))["status"] for key, sub_id in subs}

    async def wait_until_all(
        self, subs: list[tuple[str, str]], status: str, timeout_s: float = 15.0
    ) -> None:
        """Wait until every subscription has `status`; fail early if one ends otherwise."""

        async def done() -> bool:
            seen = await self.statuses(subs)
            wrong = {s: v for s, v in seen.items() if v in FINAL_SUBSCRIPTION_STATUSES - {status}}
            assert not wrong, f"subscriptions ended otherwise than {status}: {wrong}"
            return all(v == status for v in seen.values())

        await wait_for(done, timeout_s=timeout_s, interval_s=0.1)

    async def readyz(self) -> dict[str, Any]:
        response = await self.client().get("/readyz")
        assert response.status_code == 200, response.text
        ready: dict[str, Any] = response.json()
        return ready

    def server_errors(self) -> list[tuple[str, str, int]]:
        return [answer for answer in self.answers if answer[2] >= 500]

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()


@contextlib.asynccontextmanager
async def running_relay(settings: Settings) -> AsyncIterator[Relay]:
    """relay (API and worker) on a real socket; on a clean exit, no API answer was a 5xx."""
    with serve_in_thread(create_app(settings)) as base_url:
        relay = Relay(base_url)
        try:
            yield relay
        finally:
            await relay.aclose()
    assert not relay.server_errors(), relay.server_errors()
    assert relay.answers, "the test made no API request"


async def control(upstream_url: str, method: str, path: str, body: object = None) -> Any:
    """The simulator's control API over HTTP (safe from this thread, unlike its objects)."""
    async with httpx.AsyncClient(base_url=upstream_url, timeout=10) as client:
        response = await client.request(method, path, json=body)
        assert response.status_code < 300, response.text
        return response.json()


def gaps(times: list[float]) -> list[float]:
    return [after - before for before, after in itertools.pairwise(times)]


async def db_scalar(db_url: str, sql: str) -> Any:
    database = open_test_database(db_url)
    try:
        async with asyncio.timeout(10), database.reader() as conn:
            return (await conn.execute(text(sql))).scalar_one()
    finally:
        await database.dispose()


# --- Coalescing and the schedule -------------------------------------------------------------


async def test_many_subscribers_share_one_poll_stream(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """Five subscriptions (two keys, five URLs) on one generation poll it like one subscriber."""
    sim, upstream_url = fake_upstream
    keys = [await new_key(db_url, "alice"), await new_key(db_url, "bob")]
    settings = fast_settings(
        db_url, upstream_url, poll_min_interval_s=0.05, poll_max_interval_s=0.3
    )
    async with running_relay(settings) as relay:
        await relay.readyz()
        for gen_id in ("gen_shared", "gen_twin"):
            sim.add_generation("image", id=gen_id, queue_s=0.5, run_s=1.5, final_status="COMPLETED")
        shared = [
            (keys[i % 2].api_key, "gen_shared", f"{receiver.url}/shared/{i}") for i in range(5)
        ]
        requests = [*shared, (keys[0].api_key, "gen_twin", f"{receiver.url}/twin")]
        created = await asyncio.gather(*(relay.subscribe(*r) for r in requests))
        subs = [(r[0], c["id"]) for r, c in zip(requests, created, strict=True)]
        await relay.wait_until_all(subs, "delivered")

    shared_polls, twin_polls = sim.poll_count("gen_shared"), sim.poll_count("gen_twin")
    assert twin_polls >= 4, "the generations were not polled enough to compare streams"
    assert abs(shared_polls - twin_polls) <= 1, (shared_polls, twin_polls)
    for i in range(5):
        callbacks = receiver.on(f"/shared/{i}")
        assert len(callbacks) == 1
        key = keys[i % 2]
        Webhook(key.signing_secret).verify(callbacks[0].body, callbacks[0].headers)
        assert orjson.loads(callbacks[0].body)["id"] == "gen_shared"
    assert len(receiver.on("/twin")) == 1
    assert await db_scalar(db_url, "SELECT count(*) FROM generations") == 2


async def test_gap_grows_while_unchanged_and_drops_after_a_change(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """Polls of an unchanged status spread out; the poll after IN_PROGRESS is seen comes fast."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    settings = fast_settings(
        db_url, upstream_url, poll_min_interval_s=0.05, poll_max_interval_s=1.0
    )
    async with running_relay(settings) as relay:
        await relay.readyz()  # connect first: the queue time is for polls, not for set-up
        gen = sim.add_generation("video", id="gen_slow", queue_s=2.5, run_s=0.6)
        sub = await relay.subscribe(key.api_key, "gen_slow", f"{receiver.url}/slow")
        await relay.wait_until_all([(key.api_key, sub["id"])], "delivered")

    times = sim.poll_times("gen_slow")
    queued = [t for t in times if t < gen.started_at]
    queue_gaps = gaps(queued)
    assert len(queue_gaps) >= 4, times
    # Growth of 1.5 times per poll: the last gap in the queue is many times the first.
    assert queue_gaps[-1] >= 3 * queue_gaps[0], queue_gaps
    assert sum(queue_gaps[len(queue_gaps) // 2 :]) > 2 * sum(queue_gaps[: len(queue_gaps) // 2])
    # The first poll that saw IN_PROGRESS, and the one after it.
    first_running = len(queued)
    assert first_running + 1 < len(times), "no poll after the status changed"
    gap_before_change = times[first_running] - times[first_running - 1]
    gap_after_change = times[first_running + 1] - times[first_running]
    assert gap_after_change <= gap_before_change / 2, (gap_before_change, gap_after_change)


async def test_a_new_subscription_is_polled_within_the_minimum_interval(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """The first poll follows a new subscription within RELAY_POLL_MIN_INTERVAL."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    sim.add_generation("video", id="gen_new", queue_s=30, run_s=30)
    sim.add_generation("video", id="gen_later", queue_s=30, run_s=30)
    settings = fast_settings(db_url, upstream_url, poll_min_interval_s=1.0, poll_max_interval_s=2.0)
    async with running_relay(settings) as relay:
        for gen_id in ("gen_new", "gen_later"):
            subscribed_at = time.time()
            await relay.subscribe(key.api_key, gen_id, f"{receiver.url}/{gen_id}")
            await wait_for(lambda gen_id=gen_id: sim.poll_count(gen_id) > 0, timeout_s=5)
            waited_s = sim.poll_times(gen_id)[0] - subscribed_at
            assert 0 <= waited_s <= settings.poll_min_interval_s, (gen_id, waited_s)
            # Let the worker go idle before the second subscription.
            await asyncio.sleep(0.5)


# --- Upstream faults ---------------------------------------------------------------------------

TRANSIENT_FAULTS: dict[str, dict[str, Any]] = {
    "server_errors": {"faults": {"error_rate": 0.75}},
    "timeouts": {"faults": {"hang_rate": 0.5, "hang_s": 30.0}},
    "malformed_json": {"faults": {"malformed_rate": 0.75}},
    "not_found_for_a_while": {"not_found_for_s": 0.8},
    "legacy_statuses": {"legacy_status": True},
}
OUTCOMES: tuple[FinalStatus, ...] = ("COMPLETED", "FAILED", "CANCELED")


async def test_transient_upstream_faults_still_complete(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """5xx, timeouts, malformed JSON, 404 for a while and legacy statuses each end in the normal
    final callback, losing no subscription."""
    sim, upstream_url = fake_upstream
    keys = [await new_key(db_url, "alice"), await new_key(db_url, "bob")]
    settings = fast_settings(
        db_url,
        upstream_url,
        poll_min_interval_s=0.05,
        poll_max_interval_s=0.3,
        upstream_timeout_s=0.3,
        not_found_grace_s=30.0,
    )
    # One generation per fault class and final status, each with its own faults.
    generations = {
        f"gen_{fault}_{outcome.lower()}": (fault, outcome)
        for fault in TRANSIENT_FAULTS
        for outcome in OUTCOMES
    }
    async with running_relay(settings) as relay:
        # Subscribed first (upstream answers 404 until they exist), so each lifecycle is polled
        # from its start however long the subscriptions took.
        requests = [
            (key.api_key, gen_id, f"{receiver.url}/{gen_id}/{key.name}")
            for gen_id in generations
            for key in keys
        ]
        created = await asyncio.gather(*(relay.subscribe(*r) for r in requests))
        subs = [(r[0], c["id"]) for r, c in zip(requests, created, strict=True)]
        for gen_id, (fault, outcome) in generations.items():
            spec = TRANSIENT_FAULTS[fault]
            sim.add_generation(
                "image", id=gen_id, queue_s=0.2, run_s=0.8, final_status=outcome, **spec
            )
        await relay.wait_until_all(subs, "delivered", timeout_s=30)
        for key in keys:
            listed = await relay.client(key.api_key).get("/v1/subscriptions?limit=500")
            assert len(listed.json()["items"]) == len(generations)
        assert (await relay.readyz())["database"] == "ok"

    # Each fault really happened (only its own generations have it).
    stats = sim.stats()
    assert {"500", "502", "503"} <= set(stats["by_status_code"]), stats
    assert stats["faults"]["hang"] > 0, stats
    assert stats["faults"]["malformed"] > 0, stats
    for gen_id, (fault, _) in generations.items():
        if fault == "not_found_for_a_while":
            gen = sim.generations[gen_id]
            created_at = gen.created_mono + gen.wall_offset_s
            window = [t for t in sim.poll_times(gen_id) if created_at < t < created_at + 0.75]
            assert window, f"{gen_id} was not polled while upstream still answered 404"
    for gen_id, (fault, outcome) in generations.items():
        for key in keys:
            callbacks = receiver.on(f"/{gen_id}/{key.name}")
            assert len(callbacks) >= 1, (fault, gen_id)
            assert callbacks[0].headers["relay-event"] == f"generation.{outcome.lower()}"
            # The body is upstream's, legacy spelling included.
            assert orjson.loads(callbacks[0].body) == sim.generations[gen_id].body(2), fault


async def test_429_retry_after_is_honoured(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """While upstream answers 429 with Retry-After, polls are at least that far apart."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    retry_after_s = 0.6
    await control(
        upstream_url,
        "PUT",
        "/_fake/faults",
        {"rate_limit_rate": 1.0, "retry_after_s": retry_after_s},
    )
    sim.add_generation("image", id="gen_limited", queue_s=0.0, run_s=0.2)
    settings = fast_settings(
        db_url, upstream_url, poll_min_interval_s=0.05, poll_max_interval_s=0.3
    )
    async with running_relay(settings) as relay:
        sub = await relay.subscribe(key.api_key, "gen_limited", f"{receiver.url}/limited")
        await wait_for(lambda: sim.poll_count("gen_limited") >= 4, timeout_s=10)
        assert (await relay.get(key.api_key, sub["id"]))["status"] == "active"
        # Polls 1-3 were answered 429 before poll 4 was sent: their gaps show the wait.
        limited = sim.poll_times("gen_limited")[:4]
        await control(upstream_url, "PUT", "/_fake/faults", {"rate_limit_rate": 0.0})
        await relay.wait_until_all([(key.api_key, sub["id"])], "delivered")

    assert sim.stats()["by_status_code"]["429"] >= 3
    # Without Retry-After the backoff would start at 0.05 s and double.
    assert min(gaps(limited)) >= retry_after_s * 0.9, gaps(limited)
    assert len(receiver.on("/limited")) == 1


async def test_unknown_id_and_ttl_end_in_expiry_notices(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """404 past the grace ends as RELAY_NOT_FOUND, TTL as RELAY_EXPIRED: subscriptions expire."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    sim.add_generation("video", id="gen_forever", queue_s=60, run_s=60)
    settings = fast_settings(
        db_url,
        upstream_url,
        poll_min_interval_s=0.05,
        poll_max_interval_s=0.2,
        not_found_grace_s=0.5,
        generation_ttl_s=1.5,
    )
    expected = {"gen_unknown": "RELAY_NOT_FOUND", "gen_forever": "RELAY_EXPIRED"}
    async with running_relay(settings) as relay:
        subs = {}
        for gen_id in expected:
            created = await relay.subscribe(key.api_key, gen_id, f"{receiver.url}/{gen_id}")
            subs[gen_id] = created
        started = time.time()
        await relay.wait_until_all([(key.api_key, s["id"]) for s in subs.values()], "expired")
        elapsed_s = time.time() - started
        final = {gen_id: await relay.get(key.api_key, s["id"]) for gen_id, s in subs.items()}

    assert elapsed_s >= 1.0  # not before the TTL (1.5 s, measured from the first subscription)
    assert final["gen_forever"]["generation_status"] == "IN_QUEUE"
    for gen_id, code in expected.items():
        callbacks = receiver.on(f"/{gen_id}")
        assert len(callbacks) == 1
        assert callbacks[0].headers["relay-event"] == "generation.expired"
        Webhook(key.signing_secret).verify(callbacks[0].body, callbacks[0].headers)
        notice = orjson.loads(callbacks[0].body)
        assert set(notice) == NOTICE_KEYS
        assert notice["id"] == gen_id
        assert notice["status"] == "FAILED"
        assert (notice["input"], notice["data"], notice["usage"]) == (None, None, None)
        assert notice["code"] == code
        assert notice["message"]
    not_found_polls = sim.poll_times("gen_unknown")
    assert not_found_polls[-1] - not_found_polls[0] >= settings.not_found_grace_s * 0.9
    assert await db_scalar(db_url, "SELECT count(*) FROM generations WHERE state = 'expired'") == 2


async def test_unauthorized_keeps_subscriptions_and_retries_slowly(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """401 then 403: subscriptions stay active, /readyz says unauthorized, polls slow down;
    once the key works again the generation completes."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    sim.add_generation("image", id="gen_auth", queue_s=0.1, run_s=0.2, final_status="COMPLETED")
    settings = fast_settings(
        db_url, upstream_url, poll_min_interval_s=0.05, poll_max_interval_s=0.3
    )
    async with running_relay(settings) as relay:
        phases: dict[str, list[float]] = {}
        for mode in ("401", "403"):
            await control(upstream_url, "PUT", "/_fake/faults", {"auth_mode": mode})
            began = time.time()
            before = sim.poll_count("gen_auth")
            if mode == "401":
                sub = await relay.subscribe(key.api_key, "gen_auth", f"{receiver.url}/auth")
            await wait_for(lambda n=before: sim.poll_count("gen_auth") >= n + 3, timeout_s=10)
            phases[mode] = [t for t in sim.poll_times("gen_auth") if t > began]
            assert (await relay.readyz())["upstream"] == "unauthorized"
            current = await relay.get(key.api_key, sub["id"])
            assert current["status"] == "active"
            assert current["attempts"] == 0
        await control(upstream_url, "PUT", "/_fake/faults", {"auth_mode": "ok"})
        await relay.wait_until_all([(key.api_key, sub["id"])], "delivered")
        assert (await relay.readyz())["upstream"] == "ok"

    for mode, times in phases.items():
        # The slow retry is RELAY_POLL_MAX_INTERVAL, not the 0.05 s minimum.
        assert min(gaps(times[:3])) >= settings.poll_max_interval_s * 0.9, (mode, gaps(times))
    assert sim.stats()["by_status_code"]["401"] >= 3
    assert sim.stats()["by_status_code"]["403"] >= 3
    assert len(receiver.on("/auth")) == 1


# --- Late registration and cancelation -------------------------------------------------------


async def test_late_subscription_to_a_final_generation_gets_it_without_a_poll(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """Subscribing to a generation relay already saw final queues the callback at once."""
    sim, upstream_url = fake_upstream
    keys = [await new_key(db_url, "alice"), await new_key(db_url, "bob")]
    sim.add_generation("speech", id="gen_done", queue_s=0.0, run_s=0.1, final_status="COMPLETED")
    settings = fast_settings(
        db_url, upstream_url, poll_min_interval_s=0.05, poll_max_interval_s=0.3
    )
    async with running_relay(settings) as relay:
        first = await relay.subscribe(keys[0].api_key, "gen_done", f"{receiver.url}/first")
        await relay.wait_until_all([(keys[0].api_key, first["id"])], "delivered")
        polls = sim.poll_count("gen_done")

        subscribed_at = time.time()
        late = await relay.subscribe(keys[1].api_key, "gen_done", f"{receiver.url}/late")
        assert late["generation_status"] == "COMPLETED"
        await wait_for(lambda: receiver.on("/late"), timeout_s=5)
        await relay.wait_until_all([(keys[1].api_key, late["id"])], "delivered")
        await asyncio.sleep(0.3)

    assert receiver.on("/late")[0].at - subscribed_at < 5.0
    assert sim.poll_count("gen_done") == polls
    assert receiver.on("/late")[0].body == receiver.on("/first")[0].body
    Webhook(keys[1].signing_secret).verify(
        receiver.on("/late")[0].body, receiver.on("/late")[0].headers
    )


async def test_canceling_the_only_subscription_stops_polling_and_a_new_one_restarts_it(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """No active subscription, no polls; a new subscription brings polling back."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    sim.add_generation("video", id="gen_cancel", queue_s=60, run_s=60, final_status="COMPLETED")
    settings = fast_settings(
        db_url, upstream_url, poll_min_interval_s=0.05, poll_max_interval_s=0.2
    )
    async with running_relay(settings) as relay:
        client = relay.client(key.api_key)
        first = await relay.subscribe(key.api_key, "gen_cancel", f"{receiver.url}/first")
        await wait_for(lambda: sim.poll_count("gen_cancel") >= 3, timeout_s=5)
        canceled = await client.delete(f"/v1/subscriptions/{first['id']}")
        assert canceled.status_code == 200
        assert canceled.json()["status"] == "canceled"
        at_cancel = sim.poll_count("gen_cancel")
        await asyncio.sleep(1.0)  # five maximum gaps
        # At most one poll was already in flight when the subscription was canceled.
        assert sim.poll_count("gen_cancel") <= at_cancel + 1
        stopped = sim.poll_count("gen_cancel")
        assert await db_scalar(db_url, "SELECT state FROM generations") == "idle"

        second = await relay.subscribe(key.api_key, "gen_cancel", f"{receiver.url}/second")
        await wait_for(lambda: sim.poll_count("gen_cancel") >= stopped + 2, timeout_s=5)
        await control(upstream_url, "POST", "/_fake/generations/gen_cancel/finish")
        await relay.wait_until_all([(key.api_key, second["id"])], "delivered")
        assert (await relay.get(key.api_key, first["id"]))["status"] == "canceled"

    assert len(receiver.on("/second")) == 1
    assert receiver.on("/first") == []


# --- Crash recovery ------------------------------------------------------------------------------


async def test_sigkill_while_pending_then_restart_finishes_everything(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver, tmp_path: Path
) -> None:
    """SIGKILL a real `relay serve` mid-poll; the restarted process resumes from the database
    and every generation ends final with every subscription delivered."""
    sim, upstream_url = fake_upstream
    keys = [await new_key(db_url, "alice"), await new_key(db_url, "bob")]
    gen_ids = [f"gen_crash_{i:02d}" for i in range(20)]
    env = serve_env(
        db_url,
        upstream_url,
        RELAY_POLL_MAX_INTERVAL="0.5",
        RELAY_UPSTREAM_TIMEOUT="2",
        RELAY_LEASE="2",
        RELAY_LOG_LEVEL="WARNING",
    )
    log_path = tmp_path / "relay.log"
    holders = {g: keys if i % 4 == 0 else keys[:1] for i, g in enumerate(gen_ids)}
    subs: list[tuple[str, str]] = []
    async with relay_process(env, log_path) as (process, base_url):
        api = Relay(base_url)
        try:
            # Subscribed before upstream knows them (404s), so their lifecycles start together
            # below, whatever the time the subscriptions took on a loaded machine.
            for gen_id in gen_ids:
                for key in holders[gen_id]:
                    url = f"{receiver.url}/{gen_id}/{key.name}"
                    subs.append(
                        (key.api_key, (await api.subscribe(key.api_key, gen_id, url))["id"])
                    )
            added_at = time.time()
            for i, gen_id in enumerate(gen_ids):
                sim.add_generation(
                    "image", id=gen_id, queue_s=0.2, run_s=3.0 + 0.05 * i, final_status="COMPLETED"
                )
            await wait_for(
                lambda: all(sim.poll_times(g)[-1:] > [added_at] for g in gen_ids), timeout_s=10
            )
            process.send_signal(signal.SIGKILL)
            async with asyncio.timeout(10):
                await process.wait()
        finally:
            await api.aclose()
        assert not api.server_errors(), api.server_errors()

    polls_at_kill = sum(sim.poll_count(g) for g in gen_ids)
    pending = await db_scalar(db_url, "SELECT count(*) FROM generations WHERE state = 'polling'")
    assert pending >= 10, "too few generations were pending when the relay was killed"
    active = await db_scalar(db_url, "SELECT count(*) FROM subscriptions WHERE status = 'active'")
    assert active >= 10

    async with relay_process(env, log_path) as (_, base_url):

        async def all_delivered() -> bool:
            delivered = await db_scalar(
                db_url, "SELECT count(*) FROM subscriptions WHERE status = 'delivered'"
            )
            return bool(delivered == len(subs))

        await wait_for(all_delivered, timeout_s=45, interval_s=0.2)
        api = Relay(base_url)
        try:
            for api_key, sub_id in subs:
                sub = await api.get(api_key, sub_id)
                assert sub["status"] == "delivered"
                assert sub["generation_status"] == "COMPLETED"
        finally:
            await api.aclose()
        assert not api.server_errors(), api.server_errors()

    assert sum(sim.poll_count(g) for g in gen_ids) > polls_at_kill
    assert await db_scalar(db_url, "SELECT count(*) FROM generations WHERE state = 'final'") == 20
    assert await db_scalar(db_url, "SELECT count(*) FROM generations") == 20
    for gen_id in gen_ids:
        for key in holders[gen_id]:
            callbacks = receiver.on(f"/{gen_id}/{key.name}")
            assert callbacks, f"no callback for {gen_id} ({key.name})"
            # At least once: a retry after the crash keeps the message id.
            assert len({c.headers["webhook-id"] for c in callbacks}) == 1
            Webhook(key.signing_secret).verify(callbacks[0].body, callbacks[0].headers)
            assert orjson.loads(callbacks[0].body)["status"] == "COMPLETED"
