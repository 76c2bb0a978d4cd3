"""Batch sweeps: one request lists up to 100 running generations, in place of a per-id poll of
each of them.

A tick decides whether a sweep pays for itself now (schedule.sweep_interval_s, from how many
generations a sweep would cover and how much of them the last list covered), and if so
becomes the one node sweeping (store.take_sweep: one sweep at a time across every process
sharing the database, never more often than the interval), asks the upstream for its running
list through the same request budget as polls, and applies it (store.apply_sweep): listed
generations need no per-id poll for a while; with a complete list, watched generations
missing from it are fetched at once. When a list cut short showed too few of ours for sweeps
to pay, the list is looked at again every RELAY_POLL_MAX_INTERVAL (a look that plans nothing
and defers no poll). An upstream that answers 404, 405 or 501 has no list: sweeps stop for an
hour, cluster-wide.

This module decides when and asks; it writes no SQL and polls no generation by id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from relay import store
from relay.config import Settings
from relay.database import Database
from relay.health import UpstreamHealth
from relay.metrics import Metrics
from relay.outages import report_failure
from relay.ratelimit import TokenBucket
from relay.schedule import sweep_interval_s, unchanged_polls_for
from relay.signals import Signals
from relay.upstream import RunningList, UpstreamClient

logger = logging.getLogger(__name__)

LIST_LIMIT = 100  # the most the running list gives (upstream.md)
SWEEPS_OFF_S = 3600.0  # after the upstream said it has no running list
# A count reads every polling generation (tens of ms at 100,000 on SQLite): counts are spaced so
# that they take at most this share of the time, however many generations there are.
COUNT_TIME_SHARE = 0.01


class Sweeper:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        upstream: UpstreamClient,
        budget: TokenBucket,
        signals: Signals,
        health: UpstreamHealth,
        owner: str,
        *,
        metrics: Metrics | None = None,
        on_polls_queued: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._settings = settings
        self._upstream = upstream
        self._budget = budget
        self._signals = signals
        self._health = health
        self._owner = owner
        self._on_polls_queued = on_polls_queued
        self._metrics = metrics or Metrics(enabled=False)
        self._clock = clock
        self._counts: store.SweepCounts | None = None
        self._counted_at = -float("inf")
        self._count_s = 0.0  # how long the last count took
        self._counts_stale = False  # a sweep changed what is due since the last count
        self._sweeping = False
        # How much of what a sweep could cover the last list showed (1 for a complete list):
        # with more running generations than the list holds, a sweep covers only part.
        self.coverage = 1.0
        self.interval_s: float | None = None  # the cadence decided last; None: no sweep pays
        self._last_sweep = -float("inf")  # this node's last sweep (monotonic)

    async def tick(self) -> None:
        """Sweep if a sweep pays for itself now and it is this node's turn; a tick that comes
        while a sweep runs does nothing."""
        if self._sweeping:
            return
        self._sweeping = True
        try:
            await self._tick()
        except Exception as exc:  # the next tick tries again
            report_failure(logger, exc, self._db.outage, "sweeps", "sweep failed")
        finally:
            self._sweeping = False

    async def _tick(self) -> None:
        if self._signals.sweeps_off():
            self.interval_s = None
            return
        counts = await self._count()
        self.interval_s = self._interval(counts, self.coverage)
        probing = False
        if self.interval_s is None and self.coverage < 1.0 and self._interval(counts, 1.0):
            # A list cut short showed too few of ours to pay (say, at the start of a burst, or
            # while another app's generations fill it); it changes, so look again now and then,
            # or one reading would stop sweeps for good. A look plans no sweep and defers no
            # per-id poll: it only measures again.
            settings = self._settings
            self.interval_s = max(settings.poll_max_interval_s, settings.sweep_min_interval_s)
            probing = True
        if self.interval_s is None or self._clock() - self._last_sweep < self.interval_s:
            return
        lease_s = self._settings.upstream_timeout_s + 5
        sent_at = await store.take_sweep(
            self._db, self._owner, self.interval_s, lease_s, plan_next=not probing
        )
        self._last_sweep = self._clock()  # taken, or another node swept a moment ago
        if sent_at is None:
            return
        try:
            await self._budget.take()
            answer = await self._upstream.list_running(LIST_LIMIT)
            await self._apply(answer, sent_at, counts, probing)
        finally:
            await store.release_sweep(self._db, self._owner)

    def _interval(self, counts: store.SweepCounts, coverage: float) -> float | None:
        """The sweep cadence if `coverage` of the counted generations would be listed."""
        settings = self._settings
        return sweep_interval_s(
            counts.covered * coverage,
            (counts.total - counts.covered) * coverage,
            counts.hinted_due * coverage,
            min_interval_s=settings.sweep_min_interval_s,
            poll_min_interval_s=settings.poll_min_interval_s,
            hinted_interval_s=settings.hinted_poll_interval_s,
        )

    async def _count(self) -> store.SweepCounts:
        """What a sweep would cover, counted again every two shortest sweep intervals or
        after a sweep changed it, but never so often that counting (which reads every polling
        generation) takes more than COUNT_TIME_SHARE of the time."""
        age_s = self._clock() - self._counted_at
        # Capped: one count slowed by a database stall must not freeze the counts for long.
        least_gap_s = min(self._count_s / COUNT_TIME_SHARE, self._settings.poll_max_interval_s)
        max_age_s = max(2 * self._settings.sweep_min_interval_s, least_gap_s)
        stale = self._counts_stale and age_s >= least_gap_s
        if self._counts is None or stale or age_s > max_age_s:
            due_before = self._db.now() + timedelta(seconds=self._settings.sweep_min_interval_s)
            started = self._clock()
            self._counts = await store.sweep_counts(
                self._db, self._signals.hints_flowing(), due_before
            )
            self._counted_at = self._clock()
            self._count_s = self._counted_at - started
            self._counts_stale = False
        return self._counts

    async def _apply(
        self, answer: RunningList, sent_at: datetime, counts: store.SweepCounts, probing: bool
    ) -> None:
        self._health.observe(answer)
        outcome: str = answer.kind if answer.kind != "unauthorized" else "error"
        if answer.kind == "ok" and not answer.complete:
            outcome = "partial"
        self._metrics.sweep(outcome)
        if answer.kind == "ok":
            # Listed generations need no per-id poll until a little after the next sweeps;
            # if sweeps stop paying, their per-id polls resume that soon.
            assert self.interval_s is not None
            cover_s = 0.0 if probing else 2 * self.interval_s + self._settings.sweep_min_interval_s
            cover_until = self._db.now() + timedelta(seconds=cover_s)
            settings = self._settings

            def unchanged_for(age_s: float) -> int:
                return unchanged_polls_for(
                    age_s, settings.poll_min_interval_s, settings.poll_max_interval_s
                )

            result = await store.apply_sweep(
                self._db, answer.items, answer.complete, sent_at, cover_until, unchanged_for
            )
            sweepable = max(1, counts.total)
            self.coverage = 1.0 if answer.complete else min(1.0, result.listed / sweepable)
            self._counts_stale = True  # what is due has changed
            logger.debug(
                "sweep: %d running listed (%s), %d watched listed, %d missing fetched now",
                len(answer.items),
                "complete" if answer.complete else "may be cut short",
                result.listed,
                result.missing,
            )
            if result.missing:
                self._on_polls_queued()
        elif answer.kind == "unsupported":
            until = self._db.now() + timedelta(seconds=SWEEPS_OFF_S)
            await store.turn_sweeps_off(self._db, until)
            logger.warning(
                "the upstream has no running list (%s): batch sweeps are off for %g s, "
                "generations are polled by id",
                answer.error,
                SWEEPS_OFF_S,
            )
        elif answer.kind == "rate_limited":
            pause_s = min(answer.retry_after_s or self._settings.poll_min_interval_s, 60.0)
            self._budget.pause(pause_s)
            self._metrics.upstream_paused(pause_s)
