"""Polling: claim due generations, poll each once, record what was seen.

One poll stream per generation, however many subscribe: the unit claimed is a `generations`
row. A tick drains what is due in rounds bounded by free concurrency and the upstream rate cap;
each poll's outcome is recorded in its own transaction (status, final body, counters, next poll
time and, when the generation ends, one delivery per active subscription).

`plan_record` is the pure part: from the claimed row and the poll result to the row's changes.
The claim loop, the task per poll and the close sequence are draining.py's `Drainer`.
This module never writes SQL (the store does) and never sends callbacks (deliverer.py does).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import orjson

from relay import store
from relay.batching import Batcher
from relay.config import Settings
from relay.database import Database
from relay.draining import CLAIM_BATCH_MAX, Drainer, DrainLimits
from relay.health import UpstreamHealth
from relay.metrics import Metrics
from relay.models import EVENT_BY_FINAL_STATUS, CallbackEvent, GenerationState, Listing
from relay.outages import report_failure
from relay.ratelimit import TokenBucket
from relay.schedule import TERMINAL_HINT_PATIENCE_S, error_gap_s, hinted_gap_s, poll_gap_s
from relay.signals import Signals
from relay.statuses import FINAL_STATUSES, TERMINAL_RANK, status_rank
from relay.upstream import PollResult, UpstreamClient

logger = logging.getLogger(__name__)


def notice_body(generation_id: str, code: str, message: str) -> str:
    """The give-up notice, in the upstream's result shape."""
    return orjson.dumps(
        {
            "id": generation_id,
            "status": "FAILED",
            "input": None,
            "data": None,
            "usage": None,
            "code": code,
            "message": message,
        }
    ).decode()


def plan_record(
    claimed: store.ClaimedGeneration,
    result: PollResult,
    now: datetime,
    settings: Settings,
    rand: Callable[[], float],
    hints_flowing: bool = False,
) -> store.PollRecord:
    """What this poll changes on the generation's row (pure). `hints_flowing`: push hints
    arrive, so a generation they reach is polled only as a safety net."""
    min_s, max_s = settings.poll_min_interval_s, settings.poll_max_interval_s
    values: dict[str, Any] = {"last_polled_at": now, "lease_owner": None}
    gap_s: float
    if result.kind == "ok":
        assert result.status is not None
        values.update(status=result.status, error_count=0, not_found_since=None, last_error=None)
        if result.status in FINAL_STATUSES:
            values.update(
                state=GenerationState.FINAL, result=result.body, final_at=now, next_poll_at=None
            )
            return store.PollRecord(claimed.id, values, event=EVENT_BY_FINAL_STATUS[result.status])
        if result.status != claimed.status:
            unchanged = 0
            values["status_changed_at"] = now
        else:
            unchanged = claimed.unchanged_polls + 1
        values["unchanged_polls"] = unchanged
        gap_s = poll_gap_s(unchanged, min_s, max_s, rand)
        if hints_flowing and claimed.hinted_at is not None:
            gap_s = max(gap_s, hinted_gap_s(settings.hinted_poll_interval_s, rand))
        if claimed.listing == Listing.MISSING:
            # Absent from a complete running list, yet running: of another workspace, or
            # not listed yet. Polled by id from now on; absence alone no longer fetches it.
            values["listing"] = Listing.UNLISTED
        elif claimed.listing == Listing.DROPPED:
            values["listing"] = None  # pushed off a list cut short: back to per-id polls
        if status_rank(claimed.hint_status) == TERMINAL_RANK:
            if claimed.hinted_at is not None and (
                (now - claimed.hinted_at).total_seconds() < TERMINAL_HINT_PATIENCE_S
            ):
                gap_s = min_s  # the upstream's GET lags behind its webhook: ask again soon
            else:
                values["hint_status"] = None  # the GET is the source of truth
    else:
        errors = claimed.error_count + 1
        values.update(error_count=errors, last_error=store.storable(result.error))
        if result.kind == "not_found":
            since = claimed.not_found_since or now
            values["not_found_since"] = since
            if (now - since).total_seconds() >= settings.not_found_grace_s:
                message = (
                    f"upstream answered 404 for this generation for "
                    f"{settings.not_found_grace_s:g} seconds; the relay gave up on it"
                )
                return _give_up(claimed.id, values, now, "RELAY_NOT_FOUND", message)
            gap_s = error_gap_s(errors, min_s, max_s, rand)
        elif result.kind == "unauthorized":
            # The relay's own key is wrong: not the generation's fault. Retry slowly.
            gap_s = max_s
        else:
            gap_s = error_gap_s(errors, min_s, max_s, rand, result.retry_after_s)
    if (now - claimed.first_subscribed_at).total_seconds() >= settings.generation_ttl_s:
        message = (
            f"the generation was not final {settings.generation_ttl_s:g} seconds after the "
            "first subscription; the relay gave up on it"
        )
        return _give_up(claimed.id, values, now, "RELAY_EXPIRED", message)
    values["next_poll_at"] = now + timedelta(seconds=gap_s)
    # A terminal hint arriving while this poll was in flight brings the next poll forward.
    soon_s = min_s if result.kind == "ok" else None
    return store.PollRecord(claimed.id, values, after_terminal_hint_s=soon_s)


def _give_up(
    generation_id: str, values: dict[str, Any], now: datetime, code: str, message: str
) -> store.PollRecord:
    notice = notice_body(generation_id, code, message)
    values.update(state=GenerationState.EXPIRED, result=notice, final_at=now, next_poll_at=None)
    return store.PollRecord(
        generation_id, values, event=CallbackEvent.EXPIRED, notice_payload=notice
    )


def upstream_budget(settings: Settings) -> TokenBucket:
    """The cap on upstream requests per second of this process (polls and sweeps)."""
    rate = settings.upstream_max_rps
    return TokenBucket(rate, burst=max(1.0, rate))


def _ended_fields(generation_id: str, event: str) -> dict[str, str]:
    return {"event": "generation.ended", "generation_id": generation_id, "callback_event": event}


class Poller(Drainer[str, store.ClaimedGeneration]):
    """Drains due polls; `tick()` is what the scheduler (or a new subscription) calls."""

    work = "polls"

    def __init__(
        self,
        db: Database,
        settings: Settings,
        upstream: UpstreamClient,
        owner: str,
        *,
        health: UpstreamHealth | None = None,
        signals: Signals | None = None,
        budget: TokenBucket | None = None,
        metrics: Metrics | None = None,
        on_deliveries_queued: Callable[[], None] = lambda: None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._records: Batcher[store.PollRecord, bool] = Batcher(self._write_records)
        # Claim no more than the rate cap lets us poll within a fraction of the lease.
        per_round = max(1, min(CLAIM_BATCH_MAX, int(settings.upstream_max_rps)))
        limits = DrainLimits(settings.poll_concurrency, per_round, settings.upstream_timeout_s + 1)
        super().__init__(limits, self._records, owner, outage=db.outage)
        self._db = db
        self._settings = settings
        self._upstream = upstream
        self._rand = rand
        self.health = health or UpstreamHealth()
        self._signals = signals
        self._metrics = metrics or Metrics(enabled=False)
        self._on_deliveries_queued = on_deliveries_queued
        # The upstream's request budget, shared with the sweeper when there is one.
        self._bucket = budget or upstream_budget(settings)
        self._turn = 0  # which key a fair claim starts with, in turn

    @property
    def in_flight_ids(self) -> list[str]:
        return list(self._in_flight)

    async def _claim_budget(self, want: int) -> int:
        # The rate's tokens are taken before the claim: a claimed generation is polled at
        # once, and the fair share of each claim is the fair share of the polls.
        # A tenth of a second's polls at a time, so claims are batches, not one per token.
        return await self._bucket.take_up_to(want, least=int(self._bucket.rate // 10))

    async def _claim_batch(self, want: int) -> list[store.ClaimedGeneration]:
        self._turn += 1
        claimed = await store.claim_due_generations(
            self._db, self._owner, want, self._settings.lease_s, turn=self._turn
        )
        self._bucket.give_back(want - len(claimed))
        self._metrics.takeovers("poll", (generation.previous_owner for generation in claimed))
        return claimed

    async def _start_batch(self, claimed: Sequence[store.ClaimedGeneration]) -> None:
        for generation in claimed:
            if generation.id in self._in_flight:
                continue  # our own lease ran out while polling it; the first poll records
            self._spawn(generation.id, self._poll_one(generation))

    async def _poll_one(self, claimed: store.ClaimedGeneration) -> None:
        try:
            result = await self._upstream.poll(claimed.id)
            self.health.observe(result)
            self._metrics.poll(result.kind)
            if result.kind == "rate_limited" and result.retry_after_s:
                self._bucket.pause(min(result.retry_after_s, 60.0))
                self._metrics.upstream_paused(min(result.retry_after_s, 60.0))
            if result.kind == "ok" and result.status not in FINAL_STATUSES | {
                "IN_QUEUE",
                "IN_PROGRESS",
            }:
                logger.warning(
                    "unknown upstream status %r for generation %s; treating it as not final",
                    result.status,
                    claimed.id,
                    extra={"event": "poll.unknown_status", "generation_id": claimed.id},
                )
            hints_flowing = self._signals is not None and self._signals.hints_flowing()
            record = plan_record(
                claimed, result, self._db.now(), self._settings, self._rand, hints_flowing
            )
            kept = await self._records.submit(record)
            if not kept:
                logger.warning(
                    "lease on generation %s was lost; its poll is discarded",
                    claimed.id,
                    extra={"event": "poll.lease_lost", "generation_id": claimed.id},
                )
            elif record.event is not None:
                logger.info(
                    "generation %s ended: %s",
                    claimed.id,
                    record.event,
                    extra=_ended_fields(claimed.id, record.event),
                )
                self._metrics.generation_ended(record.event)
                self._on_deliveries_queued()
        except Exception as exc:
            # The lease runs out and the generation is polled again: nothing is lost.
            report_failure(logger, exc, self._outage, self.work, "poll of %s failed", claimed.id)

    async def _write_records(self, records: Sequence[store.PollRecord]) -> list[bool]:
        return await store.record_polls(self._db, self._owner, records)

    async def renew_leases(self) -> None:
        await store.renew_generation_leases(
            self._db, self._owner, self.in_flight_ids, self._settings.lease_s
        )
