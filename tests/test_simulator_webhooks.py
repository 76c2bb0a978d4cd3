"""The simulator's signed workspace webhooks, received by a real receiver over real HTTP and
verified with the independent `standardwebhooks` package."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx
import orjson
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.helpers import Received, Receiver, wait_for
from tests.simulator_support import create, simulator_fixtures, stats

SECRET = "whsec_" + base64.b64encode(b"simulator-webhook-secret-one").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"simulator-webhook-secret-two").decode()
ID_LOCATIONS = ("prediction.id", "data.prediction.id", "data.id", "id", "task_id", "data.task_id")


served, client = simulator_fixtures()


async def hooks_on(client: httpx.AsyncClient, receiver: Receiver, **settings: Any) -> None:
    body = {"url": f"{receiver.url}/hook", "secrets": [SECRET], **settings}
    answer = await client.put("/_fake/webhooks", json=body)
    assert answer.status_code == 200, answer.text


def payload(hook: Received) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(hook.body)
    return body


def generation_id(body: dict[str, Any]) -> str | None:
    """relay's contract: the first string at these locations, in this order."""
    for location in ID_LOCATIONS:
        value: Any = body
        for part in location.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str):
            return value
    return None


async def received(receiver: Receiver, count: int, timeout_s: float = 5.0) -> list[Received]:
    await wait_for(lambda: len(receiver.on("/hook")) >= count, timeout_s)
    return receiver.on("/hook")


async def test_each_phase_sends_a_signed_event(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    """created, started and completed arrive in order, each verifiable, each its own id."""
    await hooks_on(client, receiver)
    created = await create(client, family="image", queue_s=0.1, run_s=0.1, final_status="COMPLETED")
    hooks = await received(receiver, 3)
    bodies = [Webhook(SECRET).verify(hook.body, hook.headers) for hook in hooks]
    assert [body["type"] for body in bodies] == ["task.created", "task.started", "task.completed"]
    predictions = [body["data"]["prediction"] for body in bodies]
    assert [p["state"] for p in predictions] == ["queued", "running", "succeeded"]
    assert [p["status"] for p in predictions] == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    assert {p["id"] for p in predictions} == {created["id"]}
    assert predictions[0]["model"] == "fake/image"
    assert len({hook.headers["webhook-id"] for hook in hooks}) == 3
    assert [body["id"] for body in bodies] == [hook.headers["webhook-id"] for hook in hooks]
    await asyncio.sleep(0.2)
    assert len(receiver.on("/hook")) == 3
    totals = (await stats(client))["webhooks"]
    assert (totals["events"], totals["sent"], totals["delivered"]) == (3, 3, 3)


async def test_finish_sends_the_final_event_now(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    """finish makes a queued generation final at once: started and failed are sent then."""
    await hooks_on(client, receiver)
    created = await create(client, family="video", queue_s=60, run_s=60)
    await received(receiver, 1)
    answer = await client.post(
        f"/_fake/generations/{created['id']}/finish", json={"status": "FAILED"}
    )
    assert answer.status_code == 200
    hooks = await received(receiver, 3, timeout_s=2.0)
    assert [payload(hook)["type"] for hook in hooks] == [
        "task.created",
        "task.started",
        "task.failed",
    ]
    canceled = await create(client, family="video", queue_s=0, run_s=60)
    await client.post(f"/_fake/generations/{canceled['id']}/finish", json={"status": "CANCELED"})
    hooks = await received(receiver, 6, timeout_s=2.0)
    last = payload(hooks[-1])
    assert (last["type"], last["data"]["prediction"]["state"]) == ("task.canceled", "canceled")


@pytest.mark.parametrize("location", ID_LOCATIONS)
async def test_the_id_sits_where_asked(
    client: httpx.AsyncClient, receiver: Receiver, location: str
) -> None:
    """id_location puts the generation id at that path, and relay's lookup order finds it."""
    await hooks_on(client, receiver, id_location=location, events=["task.completed"])
    created = await create(client, family="speech", final_at_s=0, final_status="COMPLETED")
    body = payload((await received(receiver, 1))[0])
    value: Any = body
    for part in location.split("."):
        value = value[part]
    assert value == created["id"]
    assert generation_id(body) == created["id"]
    assert body["type"] == "task.completed"


async def test_every_secret_signs_for_rotation(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    """With two secrets each event verifies against either one alone."""
    await hooks_on(client, receiver, secrets=[SECRET, OTHER_SECRET], events=["task.created"])
    await create(client, family="image", queue_s=60, run_s=60)
    hook = (await received(receiver, 1))[0]
    Webhook(SECRET).verify(hook.body, hook.headers)
    Webhook(OTHER_SECRET).verify(hook.body, hook.headers)
    assert len(hook.headers["webhook-signature"].split(" ")) == 2


async def test_bad_signatures_do_not_verify(client: httpx.AsyncClient, receiver: Receiver) -> None:
    """bad_signature_rate 1 signs with a key nobody has; the headers are otherwise complete."""
    await hooks_on(client, receiver, bad_signature_rate=1.0, events=["task.created"])
    await create(client, family="image", queue_s=60, run_s=60)
    hook = (await received(receiver, 1))[0]
    assert hook.headers["webhook-signature"].startswith("v1,")
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(hook.body, hook.headers)
    assert (await stats(client))["webhooks"]["bad_signature"] == 1


async def test_loss_drops_events_for_good(client: httpx.AsyncClient, receiver: Receiver) -> None:
    """loss_rate drops a seeded share of events; the rest arrive and the counts add up."""
    await hooks_on(client, receiver, loss_rate=0.5, events=["task.created"])
    items = [{"family": "image", "queue_s": 60, "run_s": 60}] * 40
    assert (await client.post("/_fake/generations/bulk", json={"items": items})).status_code == 201
    totals = (await stats(client))["webhooks"]
    assert totals["events"] == 40
    assert 5 <= totals["lost"] <= 35
    await received(receiver, 40 - totals["lost"])
    await asyncio.sleep(0.2)
    assert len(receiver.on("/hook")) == 40 - totals["lost"]


async def test_duplicates_repeat_the_webhook_id_and_body(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    """duplicate_rate 1 sends each event twice with the same webhook-id and body."""
    await hooks_on(client, receiver, duplicate_rate=1.0, events=["task.created"])
    await create(client, family="image", queue_s=60, run_s=60)
    first, second = await received(receiver, 2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    assert (await stats(client))["webhooks"]["duplicated"] == 1


async def test_delay_and_jitter_hold_and_reorder_events(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    """delay_s holds every send; delay_jitter_s spreads them so they arrive out of order."""
    await hooks_on(client, receiver, delay_s=0.3, events=["task.created"])
    created = await create(client, family="image", queue_s=60, run_s=60)
    sent_at = created["started_at"] - 60
    hook = (await received(receiver, 1))[0]
    assert hook.at - sent_at >= 0.3
    await client.post("/_fake/reset", json={"generations": True})
    receiver.received.clear()
    await hooks_on(client, receiver, delay_s=0.0, delay_jitter_s=0.5)
    items = [{"family": "image", "queue_s": 60, "run_s": 60}] * 30
    bulk = await client.post("/_fake/generations/bulk", json={"items": items})
    order = [item["id"] for item in bulk.json()["items"]]
    arrived = [generation_id(payload(hook)) for hook in await received(receiver, 30)]
    assert sorted(arrived, key=order.index) == order
    assert arrived != order


async def test_events_filter_and_receiver_errors(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    """Only the listed events are sent; a receiver's 500 is counted as failed, not retried."""
    receiver.responses["/hook"] = [(500, {}, 0.0)]
    await hooks_on(client, receiver, events=["task.completed"])
    await create(client, family="image", queue_s=0, run_s=0.05, final_status="COMPLETED")
    await received(receiver, 1)
    await asyncio.sleep(0.2)
    assert [payload(hook)["type"] for hook in receiver.on("/hook")] == ["task.completed"]
    totals = (await stats(client))["webhooks"]
    assert (totals["filtered"], totals["sent"], totals["failed"], totals["delivered"]) == (
        2,
        1,
        1,
        0,
    )


async def test_other_workspace_and_off_send_nothing(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    """Another workspace's generations send nothing; with url null nothing is even booked."""
    await hooks_on(client, receiver)
    await create(client, family="image", final_at_s=0.05, workspace="other")
    await asyncio.sleep(0.2)
    assert receiver.on("/hook") == []
    off = await client.put("/_fake/webhooks", json={"url": None})
    assert off.json()["url"] is None
    items = [{"family": "video", "queue_s": 60, "run_s": 60}] * 1000
    await client.post("/_fake/generations/bulk", json=({"items": items}))
    assert (await stats(client))["timers"] == 0
    await asyncio.sleep(0.1)
    assert receiver.on("/hook") == []


async def test_turning_webhooks_on_books_the_next_phase_only(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    """Generations that exist when webhooks are turned on send their later phases only."""
    created = await create(client, family="image", queue_s=0, run_s=0.3, final_status="FAILED")
    await hooks_on(client, receiver)
    hook = (await received(receiver, 1))[0]
    body = payload(hook)
    assert (body["type"], body["data"]["prediction"]["id"]) == ("task.failed", created["id"])


async def test_settings_are_validated(client: httpx.AsyncClient, receiver: Receiver) -> None:
    """PUT /_fake/webhooks refuses bad settings and keeps the old ones; GET returns them."""
    for bad in (
        {"url": f"{receiver.url}/hook"},  # no secret to sign with
        {"url": "ftp://x", "secrets": [SECRET]},
        {"secrets": ["plain"]},
        {"secrets": ["whsec_!!"]},
        {"loss_rate": 2},
        {"events": ["task.exploded"]},
        {"id_location": "somewhere"},
        {"colour": "red"},
        ["url"],
    ):
        assert (await client.put("/_fake/webhooks", json=bad)).status_code == 400, bad
    await hooks_on(client, receiver, loss_rate=0.25)
    current = (await client.get("/_fake/webhooks")).json()
    assert current["url"] == f"{receiver.url}/hook"
    assert (current["loss_rate"], current["id_location"]) == (0.25, "data.prediction.id")
    assert len(current["events"]) == 5


async def test_the_poll_record_tells_when_the_terminal_webhook_was_answered(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    """final_hint_at: when the receiver first answered the terminal event 2xx; null while it
    has not (or the event was lost)."""
    await hooks_on(client, receiver)
    created = await create(client, family="video", queue_s=0, run_s=60)
    record = (await client.get(f"/_fake/generations/{created['id']}/polls")).json()
    assert record["final_hint_at"] is None
    finished = (await client.post(f"/_fake/generations/{created['id']}/finish")).json()
    await received(receiver, 3)

    async def answered() -> float | None:
        polls = (await client.get(f"/_fake/generations/{created['id']}/polls")).json()
        value: float | None = polls["final_hint_at"]
        return value

    final_hint_at = await wait_for(answered)
    assert finished["final_at"] <= final_hint_at <= receiver.on("/hook")[-1].at + 0.5
