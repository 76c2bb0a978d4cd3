"""End to end in one process: subscribe over HTTP, the simulator finishes, a signed callback arrives."""

from __future__ import annotations

import httpx
import orjson
from standardwebhooks.webhooks import Webhook

from relay.app import create_app
from relay.simulator import FakeUpstream
from tests.helpers import Receiver, fast_settings, new_key, serve_in_thread, wait_for


async def test_subscription_gets_a_signed_callback(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """A subscription to a generation that completes gets one verified callback with the final body."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = sim.add_generation("image", id="gen_smoke", queue_s=0.1, run_s=0.2)
    app = create_app(fast_settings(db_url, upstream_url))
    with serve_in_thread(app) as base:
        async with httpx.AsyncClient(
            base_url=base, headers={"authorization": f"Bearer {key.api_key}"}
        ) as client:
            created = await client.post(
                "/v1/subscriptions",
                json={"generation_id": "gen_smoke", "callback_url": f"{receiver.url}/hook"},
            )
            assert created.status_code == 201, created.text
            await wait_for(lambda: receiver.on("/hook"), timeout_s=10)

            async def delivered() -> bool:
                sub = (await client.get(f"/v1/subscriptions/{created.json()['id']}")).json()
                return bool(sub["status"] == "delivered" and sub["attempts"] == 1)

            await wait_for(delivered, timeout_s=10)
    callback = receiver.on("/hook")[0]
    Webhook(key.signing_secret).verify(callback.body, callback.headers)
    body = orjson.loads(callback.body)
    assert body["status"] == "COMPLETED"
    assert body == gen.body(2)
    assert callback.headers["relay-event"] == "generation.completed"
