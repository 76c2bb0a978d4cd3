"""Quotas and fairness between keys, over real HTTP with the simulator and a real receiver, on
both databases: RELAY_MAX_ACTIVE_PER_KEY, and a poll budget shared between keys so one key's
flood of generations does not delay another key's callback."""

from __future__ import annotations

import asyncio
import time

import httpx

from relay.app import create_app
from relay.simulator import FakeUpstream
from tests.apiclient import PUBLIC_HOOK, expect_error
from tests.delivery import final_generation, running_relay, subscribe
from tests.helpers import Receiver, fast_settings, new_key, serve_in_thread, wait_for

SUBS = "/v1/subscriptions"


async def test_a_key_past_its_quota_gets_429_quota_exceeded(db_url: str) -> None:
    """With RELAY_MAX_ACTIVE_PER_KEY=3 a fourth active subscription is refused with 429
    `quota_exceeded`; a retried create of an active one still answers 200; a canceled one
    makes room; another key is not affected."""
    key = await new_key(db_url, "quota")
    other = await new_key(db_url, "other")
    settings = fast_settings(db_url, allow_private_callbacks=False, max_active_per_key=3)
    with serve_in_thread(create_app(settings, role="api")) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            auth = {"authorization": f"Bearer {key.api_key}"}

            async def create(gen_id: str, headers: dict[str, str] = auth) -> httpx.Response:
                body = {"generation_id": gen_id, "callback_url": PUBLIC_HOOK}
                return await client.post(SUBS, json=body, headers=headers)

            made = [await create(f"gen_q{i}") for i in range(3)]
            assert [r.status_code for r in made] == [201, 201, 201]
            refused = await create("gen_q3")
            error = expect_error(refused, 429, "quota_exceeded")
            assert "RELAY_MAX_ACTIVE_PER_KEY" in error.error.message
            assert (await create("gen_q0")).status_code == 200
            assert (
                await create("gen_q9", {"authorization": f"Bearer {other.api_key}"})
            ).status_code == 201
            canceled = await client.delete(f"{SUBS}/{made[0].json()['id']}", headers=auth)
            assert canceled.status_code == 200
            assert (await create("gen_q3")).status_code == 201
            expect_error(await create("gen_q4"), 429, "quota_exceeded")


async def _callback_latency_s(
    client: httpx.AsyncClient, receiver: Receiver, gen_id: str, path: str
) -> float:
    started = time.monotonic()
    await subscribe(client, gen_id, f"{receiver.url}{path}")
    await wait_for(lambda: receiver.on(path), timeout_s=15, interval_s=0.02)
    return time.monotonic() - started


async def test_one_keys_flood_does_not_delay_another_keys_callback(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """Key A registers 1,500 ids the upstream answers 404 for, saturating a poll budget of
    20 requests a second; key B's callback then comes about as fast as when A was idle."""
    sim, upstream_url = fake_upstream
    a = await new_key(db_url, "a")
    b = await new_key(db_url, "b")
    settings = fast_settings(db_url, upstream_url, upstream_max_rps=20.0)
    idle_gen = final_generation(sim, "gen_b_idle")
    busy_gen = final_generation(sim, "gen_b_busy")
    async with running_relay(settings, b) as client_b:
        idle_s = await _callback_latency_s(client_b, receiver, idle_gen.id, "/idle")
        async with httpx.AsyncClient(
            base_url=str(client_b.base_url),
            headers={"authorization": f"Bearer {a.api_key}"},
            timeout=30,
        ) as client_a:
            for start in range(0, 1500, 100):
                answers = await asyncio.gather(
                    *(
                        client_a.post(
                            SUBS,
                            json={
                                "generation_id": f"gen_missing_{i}",
                                "callback_url": f"{receiver.url}/a",
                            },
                        )
                        for i in range(start, start + 100)
                    )
                )
                assert {r.status_code for r in answers} == {201}
        # A's flood now holds the whole budget.
        polls_before = sim.unknown_id_polls
        await asyncio.sleep(2.0)
        assert sim.unknown_id_polls - polls_before >= 25
        busy_s = await _callback_latency_s(client_b, receiver, busy_gen.id, "/busy")
    print(f"B's callback: {idle_s:.2f} s with A idle, {busy_s:.2f} s with A flooding")
    assert busy_s < idle_s + 2.0


async def test_concurrent_creates_never_pass_the_quota(db_url: str) -> None:
    """Forty creates of new generations sent at once by one key with RELAY_MAX_ACTIVE_PER_KEY=5:
    exactly five answer 201 and the rest 429 `quota_exceeded` (near its quota every batch
    counts in its transaction, and the key's counted batches take turns)."""
    key = await new_key(db_url, "burst")
    settings = fast_settings(db_url, allow_private_callbacks=False, max_active_per_key=5)
    with serve_in_thread(create_app(settings, role="api")) as url:
        async with httpx.AsyncClient(
            base_url=url, timeout=10, headers={"authorization": f"Bearer {key.api_key}"}
        ) as client:

            async def create(n: int) -> httpx.Response:
                body = {"generation_id": f"gen_burst{n}", "callback_url": PUBLIC_HOOK}
                return await client.post(SUBS, json=body)

            answers = await asyncio.wait_for(
                asyncio.gather(*(create(n) for n in range(40))), timeout=20
            )
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [201] * 5 + [429] * 35, statuses
    for refused in (r for r in answers if r.status_code == 429):
        expect_error(refused, 429, "quota_exceeded")
