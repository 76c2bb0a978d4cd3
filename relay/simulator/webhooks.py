"""The workspace webhooks the simulator sends: which events are due (a generation reached a
phase), what happens to each on the way (loss, duplicates, delay, bad signatures, drawn from
a seeded RNG) and the bounded pool of POSTs that delivers them.

Sends wait in the shared Timers heap until due, then in a queue served by POOL_SIZE workers
sharing one aiohttp session. There are no retries: a lost event stands for a delivery that
never arrives, and a receiver error is only counted. It must not decide when a generation
changes phase (PhaseWatch tells it) and sends nothing while `url` is None.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Final

import aiohttp
import orjson

from relay.simulator.model import FINAL, QUEUED, RUNNING, Generation
from relay.simulator.timers import Timers
from relay.simulator.webhook_settings import (
    FINAL_EVENTS,
    WebhookSettings,
    event_payload,
    signature_header,
)

logger = logging.getLogger(__name__)

# Webhook services deliver in parallel; with 8 in flight a burst of 1,000 creates (3,000
# events) queued the terminal events behind the others for 4-6 s, measuring the sender.
POOL_SIZE: Final = 64


@dataclass(slots=True, frozen=True)
class _Send:
    msg_id: str
    body: bytes
    bad_signature: bool
    final_of: str | None  # the generation, when this is its terminal event


def _fresh_counters() -> dict[str, int]:
    return dict.fromkeys(
        (
            "events",
            "sent",
            "delivered",
            "failed",
            "lost",
            "duplicated",
            "bad_signature",
            "filtered",
        ),
        0,
    )


class WebhookEmitter:
    """Turns phase changes of own-workspace generations into signed POSTs to `settings.url`."""

    def __init__(self, timers: Timers, seed: int) -> None:
        self.settings = WebhookSettings()
        self._timers = timers
        self._rng = random.Random(f"{seed}:webhooks")
        self._keys: list[bytes] = []
        self.counters = _fresh_counters()
        # When each generation's terminal event was first answered 2xx (unix seconds): what
        # benchmarks read to tell a hint-driven detection from a polled one.
        self.final_delivered_at: dict[str, float] = {}
        self._queue: asyncio.Queue[_Send] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    @property
    def on(self) -> bool:
        return self.settings.url is not None

    def wants(self, gen: Generation) -> bool:
        """Whether phase changes of `gen` should reach this emitter."""
        return self.settings.url is not None and not gen.other_workspace

    def configure(self, settings: WebhookSettings) -> None:
        self.settings = settings
        self._keys = settings.keys()

    def reset_counters(self) -> None:
        self.counters = _fresh_counters()
        self.final_delivered_at.clear()

    def reached(self, gen: Generation, phase: int) -> None:
        """Emit the events of every phase after the last one emitted for `gen`, up to `phase`."""
        if not self.wants(gen):
            return
        for passed in range(gen.hooked_phase + 1, phase + 1):
            self._emit(gen, passed)
        gen.hooked_phase = max(gen.hooked_phase, phase)

    def _emit(self, gen: Generation, phase: int) -> None:
        settings = self.settings
        status = gen.status_of(phase)
        event = FINAL_EVENTS[status] if phase == FINAL else _PHASE_EVENTS[phase]
        if event not in settings.events:
            self.counters["filtered"] += 1
            return
        self.counters["events"] += 1
        if self._rng.random() < settings.loss_rate:
            self.counters["lost"] += 1
            return
        msg_id = f"msg_{self._rng.getrandbits(96):024x}"
        payload = event_payload(event, msg_id, gen.id, status, gen.model, settings.id_location)
        body = orjson.dumps(payload)
        copies = 1
        if self._rng.random() < settings.duplicate_rate:
            self.counters["duplicated"] += 1
            copies = 2
        now = time.monotonic()
        for _ in range(copies):
            delay_s = settings.delay_s + self._rng.uniform(0.0, settings.delay_jitter_s)
            bad = self._rng.random() < settings.bad_signature_rate
            final_of = gen.id if phase == FINAL else None
            send = _Send(msg_id, body, bad, final_of)
            self._timers.call_at(now + delay_s, self._enqueue, send)

    def _enqueue(self, item: _Send) -> None:
        # Runs on the serving loop (a Timers callback), where the pool may be started.
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._workers = [
                asyncio.create_task(self._work(self._queue), name=f"simulator-webhook-{i}")
                for i in range(POOL_SIZE)
            ]
        self._queue.put_nowait(item)

    async def _work(self, queue: asyncio.Queue[_Send]) -> None:
        while True:
            item = await queue.get()
            try:
                await self._post(item)
            except Exception:
                logger.exception("simulator webhook send failed")

    async def _post(self, item: _Send) -> None:
        settings = self.settings
        if settings.url is None:  # turned off while it waited
            return
        if self._session is None:
            self._session = aiohttp.ClientSession()
        timestamp = int(time.time())
        keys = [self._rng.randbytes(24)] if item.bad_signature else self._keys
        headers = {
            "content-type": "application/json",
            "webhook-id": item.msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(keys, item.msg_id, timestamp, item.body),
        }
        self.counters["sent"] += 1
        self.counters["bad_signature"] += item.bad_signature
        timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        try:
            async with self._session.post(
                settings.url, data=item.body, headers=headers, timeout=timeout
            ) as response:
                await response.read()
                ok = 200 <= response.status < 300
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        self.counters["delivered" if ok else "failed"] += 1
        if ok and item.final_of is not None:
            self.final_delivered_at.setdefault(item.final_of, time.time())

    def stats(self) -> dict[str, int]:
        waiting = 0 if self._queue is None else self._queue.qsize()
        return {**self.counters, "queued": waiting}

    async def close(self) -> None:
        """Stop the pool and close the session (the app's lifespan calls this)."""
        workers, self._workers, self._queue = self._workers, [], None
        for worker in workers:
            worker.cancel()
        for worker in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        if self._session is not None:
            await self._session.close()
            self._session = None


_PHASE_EVENTS: Final = {QUEUED: "task.created", RUNNING: "task.started"}
