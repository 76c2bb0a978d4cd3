"""How finals are being detected, as every node sees it: are push hints flowing, are batch
sweeps in use, and so when a new generation's first per-id poll should come.

The facts live in `relay_state` (store/state.py), written by whichever node received a hint or
swept; each process reads them about once a second (`run`), and notes its own hints at once.
Every node therefore schedules alike:

- push hints are "off" without RELAY_UPSTREAM_WEBHOOK_SECRET, "ok" while one arrived within
  RELAY_HINT_SILENCE, else "silent" (before the first one too). While they flow, a generation
  they reach is polled by id only as a safety net; when they stop, the relay says so once and
  the normal schedule returns (`on_silence` callbacks, which the worker uses to bring the
  safety-net polls forward);
- a new generation waits for the next sweep while sweeps are in use, or for its first push
  hint while hints flow, instead of being polled at once (`first_poll`).

It decides nothing about a single generation (poller.py and the store do) and owns no
schedule beyond these signals.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Literal

from relay import store
from relay.config import Settings
from relay.database import Database

logger = logging.getLogger(__name__)

REFRESH_S = 1.0
HINT_WRITE_EVERY_S = 1.0  # a node writes the cluster's last-hint time at most this often

HintsState = Literal["off", "ok", "silent"]


class Signals:
    def __init__(self, db: Database, settings: Settings) -> None:
        self._db = db
        self._settings = settings
        self._shared = store.SharedState()
        self._local_hint_at: datetime | None = None
        self._hint_written_at: datetime | None = None
        self._flowing: bool | None = None  # as last reported
        self.on_silence: list[Callable[[], Awaitable[None]]] = []

    # --- push hints ---------------------------------------------------------------------------

    @property
    def hints_configured(self) -> bool:
        return bool(self._settings.upstream_webhook_secrets)

    def last_hint_at(self) -> datetime | None:
        times = [t for t in (self._shared.last_hint_at, self._local_hint_at) if t is not None]
        return max(times) if times else None

    def hints_flowing(self) -> bool:
        """A hint arrived within RELAY_HINT_SILENCE at any node (a node without the secret
        follows the cluster: another node takes the hints in)."""
        last = self.last_hint_at()
        if last is None:
            return False
        return (self._db.now() - last).total_seconds() <= self._settings.hint_silence_s

    def hints_state(self) -> HintsState:
        """For /readyz: this node's intake is off without a secret."""
        if not self.hints_configured:
            return "off"
        return "ok" if self.hints_flowing() else "silent"

    async def note_hint(self) -> None:
        """A verified hint arrived here: flowing now, and the cluster learns it within a
        second (one small write a second at most, however many hints arrive)."""
        now = self._db.now()
        self._local_hint_at = now
        written = self._hint_written_at
        if written is None or (now - written).total_seconds() >= HINT_WRITE_EVERY_S:
            self._hint_written_at = now
            await store.note_hint(self._db, now)

    # --- batch sweeps -------------------------------------------------------------------------

    def sweeps_off(self) -> bool:
        """Off by configuration, or for a while after the upstream said it has no list."""
        if self._settings.sweep == "off":
            return True
        until = self._shared.sweeps_off_until
        return until is not None and until > self._db.now()

    def next_sweep_at(self) -> datetime | None:
        """When the next sweep is planned, while sweeps are in use (None when they are not)."""
        planned = self._shared.next_sweep_at
        if planned is None or self.sweeps_off():
            return None
        grace_s = self._settings.sweep_min_interval_s
        if planned < self._db.now() - timedelta(seconds=grace_s):
            return None  # the last plan lapsed: sweeps stopped paying
        return planned

    # --- new generations ----------------------------------------------------------------------

    def first_poll(self) -> store.FirstPoll:
        """When new generations are first polled by id, and what a remembered hint changes."""
        settings = self._settings
        delay_s = 0.0
        planned = self.next_sweep_at()
        if planned is not None:
            # The next sweep lists it (no poll needed) or finds it gone (fetched at once).
            wait_s = (planned - self._db.now()).total_seconds() + settings.sweep_min_interval_s
            delay_s = min(max(wait_s, 0.0), settings.poll_max_interval_s)
        elif self.hints_flowing():
            # Its task.created hint is on its way; a generation no hint reaches is polled
            # after the longest gap of the normal schedule.
            delay_s = settings.poll_max_interval_s
        hints_on = self.hints_configured or self._shared.last_hint_at is not None
        return store.FirstPoll(
            delay_s=delay_s,
            hint_memory_s=settings.hint_memory_s if hints_on else None,
            hinted_delay_s=settings.hinted_poll_interval_s,
        )

    # --- keeping up -------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the shared facts, and report a change in whether hints flow."""
        self._shared = await store.read_state(self._db)
        flowing = self.hints_flowing()
        if flowing == self._flowing:
            return
        previous, self._flowing = self._flowing, flowing
        if previous is None and not flowing and not self.hints_configured:
            return  # hints were never part of this relay
        if flowing:
            logger.info(
                "push hints are flowing: generations they reach are polled by id only every "
                "%g s, as a safety net",
                self._settings.hinted_poll_interval_s,
            )
        elif previous is None:
            logger.info(
                "no push hint has arrived yet (RELAY_UPSTREAM_WEBHOOK_SECRET is set): "
                "polling on the normal schedule until one does"
            )
        else:
            logger.warning(
                "push hints went silent (none for %g s, RELAY_HINT_SILENCE): the normal "
                "polling schedule returns; check the upstream's webhook settings",
                self._settings.hint_silence_s,
            )
            for callback in self.on_silence:
                await callback()

    async def try_refresh(self) -> None:
        """refresh(), where a database that does not answer only leaves the signals as they
        were (readiness reports the database)."""
        try:
            await self.refresh()
        except Exception as exc:
            logger.debug("reading the shared state failed: %s", exc)

    async def run(self) -> None:
        """Refresh about once a second until cancelled."""
        while True:
            await self.try_refresh()
            await asyncio.sleep(REFRESH_S)
