"""The frames of POST /v1/generation/sse/{provider}/{model...}: `data: {id, status, data,
usage}` at once (IN_QUEUE) and at each status change until the final one, then the end.

A stream waits on a future in its generation's `watchers`, woken by PhaseWatch's one check
per generation in the Timers heap (or by `finish`), so thousands of open streams cost a
future each and no loop of their own. `sse_cut_after_frames` / `sse_cut_after_s` (faults,
as they were when the stream opened) end a stream early, without its final frame, as a lost
stream would. It must not create generations or answer anything but the frames.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import orjson

from relay.simulator.config import FaultSettings
from relay.simulator.model import FINAL, QUEUED, Generation
from relay.simulator.watch import wake

if TYPE_CHECKING:
    from relay.simulator.state import FakeUpstream

_FRAME_KEYS = ("id", "status", "data", "usage")


def frame(body: dict[str, object]) -> bytes:
    """One SSE frame of the subset of `body` that upstream streams."""
    subset = {key: body[key] for key in _FRAME_KEYS if key in body}
    return b"data: " + orjson.dumps(subset) + b"\n\n"


async def sse_frames(
    sim: FakeUpstream, gen: Generation, faults: FaultSettings, first_body: bytes
) -> AsyncIterator[bytes]:
    """The stream of `gen`; `first_body` is the create's answer (it may lack an id)."""
    loop = asyncio.get_running_loop()
    opened = time.monotonic()
    cut_frames = faults.sse_cut_after_frames or math.inf
    cut_at = math.inf if faults.sse_cut_after_s is None else opened + faults.sse_cut_after_s
    if cut_at < math.inf:
        cut_waiter: asyncio.Future[None] = loop.create_future()
        sim.timers.call_at(cut_at, wake, cut_waiter)
    yield frame(orjson.loads(first_body))
    sent, last = 1, QUEUED
    while sent < cut_frames and sim.generations.get(gen.id) is gen:
        now = time.monotonic()
        if now >= cut_at:
            return
        phase = gen.phase_at(now)
        if phase != last:
            sent, last = sent + 1, phase
            yield frame(gen.body(phase))
            if phase == FINAL:
                return
            continue
        waiter: asyncio.Future[None] = loop.create_future()
        if gen.watchers is None:
            gen.watchers = []
        gen.watchers.append(waiter)
        sim.watch.track(gen, now)
        waits = [waiter] if cut_at == math.inf else [waiter, cut_waiter]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if gen.watchers is not None and waiter in gen.watchers:
                gen.watchers.remove(waiter)
