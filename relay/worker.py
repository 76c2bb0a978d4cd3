"""The background worker: APScheduler ticks that drive the poller, the deliverer and the
sweeper.

APScheduler 3.x (`AsyncIOScheduler`, in-memory job store) is only the clock: every durable
fact lives in the relay's tables, so any number of workers on one PostgreSQL database share
the work through leases, and a restarted worker picks up where the database says. Ticks are
short when idle (two indexed queries) and drain the backlog when not; a new subscription or a
final result kicks the right drain at once instead of waiting for the next tick.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from relay import store
from relay.config import Settings
from relay.database import Database
from relay.deliverer import Deliverer
from relay.outages import report_failure
from relay.poller import Poller
from relay.sweeps import Sweeper

logger = logging.getLogger(__name__)

CLOCK_SYNC_S = 30.0
PRUNE_EVERY_S = 300.0
# A repeated upstream webhook is ignored while its id is remembered: a day outlasts any
# sensible retry schedule of the sender.
WEBHOOK_ID_MEMORY_S = 86400.0


def tick_interval_s(settings: Settings) -> float:
    """How often an idle worker looks for due work: a fraction of the shortest poll gap,
    so work queued by another process waits well under RELAY_POLL_MIN_INTERVAL."""
    return min(1.0, max(0.05, settings.poll_min_interval_s / 4))


class Worker:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        poller: Poller,
        deliverer: Deliverer,
        sweeper: Sweeper | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.poller = poller
        self.deliverer = deliverer
        self.sweeper = sweeper
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._kicks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        tick_s = tick_interval_s(self.settings)
        lease_s = self.settings.lease_s
        jobs: list[tuple[Callable[[], Coroutine[Any, Any, None]], float, str]] = [
            (self._tick_poller, tick_s, "poll"),
            (self._tick_deliverer, tick_s, "deliver"),
            (self._renew_leases, lease_s / 3, "renew-leases"),
            (self._sync_clock, CLOCK_SYNC_S, "clock"),
            (self._prune, PRUNE_EVERY_S, "prune"),
        ]
        if self.sweeper is not None:
            # Four times per shortest sweep interval, so a due sweep is late by a quarter of
            # that at most (a tick reuses the sweeper's counts, read at most every two
            # intervals, and writes only when a sweep is due).
            jobs.append((self._tick_sweeper, self.settings.sweep_min_interval_s / 4, "sweep"))
        for func, every_s, name in jobs:
            self._scheduler.add_job(
                func,
                "interval",
                seconds=every_s,
                id=name,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
                next_run_time=datetime.now(UTC),
            )
        self._scheduler.start()

    # The scheduled ticks only start a drain and return: a drain can run for as long as
    # there is a backlog, and the scheduler must not see that as an overrunning job.
    async def _tick_poller(self) -> None:
        self.kick_poller()

    async def _tick_deliverer(self) -> None:
        self.kick_deliverer()

    async def _tick_sweeper(self) -> None:
        if self.sweeper is not None:
            self._kick(self.sweeper.tick)

    def kick_poller(self) -> None:
        self._kick(self.poller.tick)

    def kick_deliverer(self) -> None:
        self._kick(self.deliverer.tick)

    def _kick(self, tick: Callable[[], Coroutine[Any, Any, None]]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(tick())
        self._kicks.add(task)
        task.add_done_callback(self._kicks.discard)

    async def _renew_leases(self) -> None:
        try:
            await self.poller.renew_leases()
            await self.deliverer.renew_leases()
        except Exception as exc:
            report_failure(logger, exc, self.db.outage, "lease renewals", "lease renewal failed")

    async def _sync_clock(self) -> None:
        try:
            await self.db.sync_clock()
        except Exception as exc:
            report_failure(logger, exc, self.db.outage, "clock syncs", "clock sync failed")

    async def _prune(self) -> None:
        try:
            pruned = await store.prune(self.db, self.settings.retention_s)
            await store.prune_hints(self.db, self.settings.hint_memory_s, WEBHOOK_ID_MEMORY_S)
        except Exception as exc:
            report_failure(
                logger, exc, self.db.outage, "prunings", "pruning failed; it is retried later"
            )
            return
        if pruned:
            logger.info(
                "pruned %d finished subscriptions past retention",
                pruned,
                extra={"event": "prune.done", "count": pruned},
            )

    async def stop(self) -> None:
        self._scheduler.shutdown(wait=False)
        await asyncio.gather(self.poller.close(), self.deliverer.close())
        if self._kicks:
            await asyncio.wait(self._kicks, timeout=5)
