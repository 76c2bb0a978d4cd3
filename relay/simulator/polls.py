"""The hot path of the upstream surface: GET /v1/generation/{id} (raw ASGI, dispatched by
`app.UpstreamFastPath`), the bearer check, and the request faults (latency, auth, hang, 5xx,
429, malformed) that every upstream GET goes through.

It must not build bodies (generations cache their own) or change generations.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from starlette.types import Receive, Scope, Send

from relay.simulator.answers import (
    FORBIDDEN,
    MALFORMED_BODIES,
    NOT_FOUND,
    SERVER_ERRORS,
    UNAUTHORIZED,
    Answer,
    answer,
    rate_limited,
    send_answer,
)
from relay.simulator.config import FaultSettings

if TYPE_CHECKING:
    from relay.simulator.state import FakeUpstream

POLL_PREFIX: Final = "/v1/generation/"


class BearerCheck:
    """The upstream's key check: the configured key, or any non-empty bearer when None."""

    __slots__ = ("_api_key", "_expected")

    def __init__(self, api_key: str | None) -> None:
        self._api_key = None if api_key is None else api_key.encode()
        self._expected = b"" if api_key is None else b"Bearer " + api_key.encode()

    def failure(self, headers: Iterable[tuple[bytes, bytes]], mode: str) -> Answer | None:
        """None if the request may proceed, else the 401/403 answer to send."""
        if mode != "ok":
            return FORBIDDEN if mode == "403" else UNAUTHORIZED
        for name, value in headers:
            if name == b"authorization":
                if value == self._expected:
                    return None
                scheme, _, token = value.partition(b" ")
                token = token.strip()
                if scheme.lower() != b"bearer" or not token:
                    return UNAUTHORIZED
                if self._api_key is None or token == self._api_key:
                    return None
                return UNAUTHORIZED
        return UNAUTHORIZED


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _hang(sim: FakeUpstream, receive: Receive, hang_s: float) -> None:
    # Waits for the client too: a hung request nobody waits for would hold up the server's
    # shutdown for hang_s.
    waiters = [
        asyncio.ensure_future(_until_disconnect(receive)),
        asyncio.ensure_future(sim.hangs_released.wait()),
    ]
    try:
        await asyncio.wait(waiters, timeout=hang_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def request_faults(
    sim: FakeUpstream, faults: FaultSettings, scope: Scope, receive: Receive
) -> Answer | None:
    """Apply latency, the auth check and one random fault draw to an upstream request.

    Returns the answer to send instead of the real one, or None to answer normally (also
    after a hang has ended).
    """
    if faults.latency_s > 0:
        await asyncio.sleep(faults.latency_s)
    failure = sim.bearer.failure(scope["headers"], faults.auth_mode)
    if failure is not None or faults.random_rate <= 0:
        return failure
    draw = sim.fault_rng.random()
    if draw < faults.hang_rate:
        sim.fault_counts["hang"] += 1
        await _hang(sim, receive, faults.hang_s)
        return None
    if (draw := draw - faults.hang_rate) < faults.error_rate:
        sim.fault_counts["error"] += 1
        return SERVER_ERRORS[sim.fault_rng.randrange(len(SERVER_ERRORS))]
    if (draw := draw - faults.error_rate) < faults.rate_limit_rate:
        sim.fault_counts["rate_limit"] += 1
        return rate_limited(faults.retry_after_s)
    if draw - faults.rate_limit_rate < faults.malformed_rate:
        sim.fault_counts["malformed"] += 1
        return answer(200, MALFORMED_BODIES[sim.fault_rng.randrange(len(MALFORMED_BODIES))])
    return None


async def poll(sim: FakeUpstream, gen_id: str, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer GET /v1/generation/{gen_id}: record the poll, then faults, auth, the body."""
    gen = sim.record_poll(gen_id)
    prepared = await request_faults(sim, sim.faults_for(gen), scope, receive)
    if prepared is None:
        gen = sim.generations.get(gen_id)  # a hang may have outlived a reset
        now = time.monotonic()
        if gen is None or now < gen.not_found_until_mono:
            prepared = NOT_FOUND
        else:
            prepared = gen.answer(gen.phase_at(now))
    sim.by_status_code[prepared[0]] = sim.by_status_code.get(prepared[0], 0) + 1
    await send_answer(send, prepared)
