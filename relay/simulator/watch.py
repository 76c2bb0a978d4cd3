"""PhaseWatch: notices when a generation reaches a new phase, for those who need to know at
that moment rather than on the next poll: the webhook emitter and open SSE streams.

Generations never tick; their phase is computed from the clock. A generation somebody cares
about gets one check in the Timers heap at its next phase boundary (`Generation.check_due`
remembers it, so it never has two); `finish` moves the check to now. A check wakes the
generation's SSE watchers and tells the emitter, then books the next one while somebody
still cares. Nothing is booked for a generation nobody watches, so 100,000 generations with
webhooks off cost nothing here. It must not build bodies or send anything itself.
"""

from __future__ import annotations

import asyncio
import math
import time

from relay.simulator.model import FINAL, QUEUED, Generation
from relay.simulator.timers import Timers
from relay.simulator.webhooks import WebhookEmitter


def wake(waiter: asyncio.Future[None]) -> None:
    """Resolve `waiter` unless it is done already (a Timers callback, too)."""
    if not waiter.done():
        waiter.set_result(None)


class PhaseWatch:
    """Books one phase check per watched generation in the Timers heap."""

    def __init__(self, timers: Timers, emitter: WebhookEmitter) -> None:
        self._timers = timers
        self._emitter = emitter

    def track(self, gen: Generation, now_mono: float | None = None) -> None:
        """Book a check at `gen`'s next phase boundary, unless an earlier one is booked."""
        now = time.monotonic() if now_mono is None else now_mono
        phase = gen.phase_at(now)
        if phase != FINAL:
            self._book(gen, gen.started_mono if phase == QUEUED else gen.final_mono)

    def changed(self, gen: Generation) -> None:
        """`gen`'s schedule moved (finish): check it now if anybody watches it."""
        if gen.watchers is not None or self._emitter.wants(gen):
            self._book(gen, time.monotonic())

    def _book(self, gen: Generation, due_mono: float) -> None:
        if due_mono < gen.check_due:
            gen.check_due = due_mono
            self._timers.call_at(due_mono, self._check, (gen, due_mono))

    def _check(self, entry: tuple[Generation, float]) -> None:
        gen, due_mono = entry
        if gen.check_due != due_mono:
            return  # superseded by an earlier check, which has run
        gen.check_due = math.inf
        now = time.monotonic()
        phase = gen.phase_at(now)
        self._emitter.reached(gen, phase)
        self._wake_watchers(gen)
        if self._emitter.wants(gen):
            self.track(gen, now)

    def release_all(self, generations: list[Generation]) -> None:
        """Wake every SSE watcher of `generations` (they are about to be dropped)."""
        for gen in generations:
            self._wake_watchers(gen)

    @staticmethod
    def _wake_watchers(gen: Generation) -> None:
        watchers, gen.watchers = gen.watchers, None
        for waiter in watchers or ():
            wake(waiter)
