"""Delivering callbacks: claim due deliveries, POST them signed, record every attempt.

The outbox is the `deliveries` table: rows are written in the transaction that records a
final result, leased here like polls are, and released with the attempt's record. Many
callbacks are in flight at once, bounded overall and per receiver host: a receiver that hangs
until the timeout holds at most `RELAY_DELIVERY_PER_HOST` slots (and as many claimed ones
wait for them); when more of its deliveries are claimed, they and the rest of its due backlog
are given back to the table in one statement (deferred) for about the time its queue here
takes to drain, so healthy receivers keep their rate and a dead receiver's backlog is not
claimed over and over.

This module is the scheduling: claiming (the loop is draining.py's), host fairness (the
arithmetic is hostslots.py's), signing headers, retry decisions (the policy is retry.py's) and
recording. The HTTP POST is sender.py's `CallbackSender`, the seam tests replace. This module
never writes SQL.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import timedelta

from relay import __version__, store
from relay.batching import Batcher
from relay.config import Settings
from relay.database import Database
from relay.draining import CLAIM_BATCH_MAX, Drainer, DrainLimits
from relay.hostslots import HostSlots, Offer
from relay.metrics import Metrics
from relay.outages import report_failure
from relay.retry import Outcome, decide, parse_retry_after
from relay.sender import CallbackSender
from relay.signing import sign_all

logger = logging.getLogger(__name__)

USER_AGENT = f"relay/{__version__}"


def callback_headers(delivery: store.ClaimedDelivery, timestamp: int) -> dict[str, str]:
    """The headers of one attempt: re-signed per attempt, same webhook-id on every one."""
    return {
        "content-type": "application/json",
        "webhook-id": delivery.webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign_all(
            delivery.signing_secrets, delivery.webhook_id, timestamp, delivery.body
        ),
        "relay-event": delivery.event,
        "relay-subscription-id": delivery.subscription_id,
        "relay-attempt": str(delivery.subscription_attempts + 1),
        "user-agent": USER_AGENT,
    }


def attempt_fields(
    delivery: store.ClaimedDelivery, status_code: int | None, duration_ms: int | None, action: str
) -> dict[str, object]:
    """A callback attempt's fields in the logs (JSON lines carry them as they are)."""
    return {
        "event": f"callback.{action}",
        "subscription_id": delivery.subscription_id,
        "webhook_id": delivery.webhook_id,
        "attempt": delivery.subscription_attempts + 1,
        "status_code": status_code,
        "duration_ms": duration_ms,
        "host": delivery.host,
    }


class Deliverer(Drainer[int, store.ClaimedDelivery]):
    """Drains due deliveries; `tick()` is what the scheduler (or a final result) calls."""

    work = "callbacks"

    def __init__(
        self,
        db: Database,
        settings: Settings,
        sender: CallbackSender,
        owner: str,
        *,
        metrics: Metrics | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._records: Batcher[store.AttemptRecord, None] = Batcher(self._write_records)
        limits = DrainLimits(
            settings.delivery_concurrency, CLAIM_BATCH_MAX, settings.delivery_timeout_s + 1
        )
        super().__init__(limits, self._records, owner, outage=db.outage)
        self._db = db
        self._settings = settings
        self._sender = sender
        self._rand = rand
        self._metrics = metrics or Metrics(enabled=False)
        # Claimed deliveries waiting for a slot of their host take a slot of the overall
        # concurrency too; their leases are renewed like those in flight.
        self._slots: HostSlots[store.ClaimedDelivery] = HostSlots(
            settings.delivery_per_host, rand=rand
        )
        self._held: set[int] = set()  # ids in flight or waiting: never queued twice

    @property
    def in_flight_ids(self) -> list[int]:
        """Every delivery this process holds a lease on: sending or waiting for its host."""
        return [*self._in_flight, *(d.id for d in self._slots.waiting())]

    def _slots_taken(self) -> int:
        return len(self._in_flight) + self._slots.waiting_count

    async def _claim_batch(self, want: int) -> list[store.ClaimedDelivery]:
        claimed = await store.claim_due_deliveries(
            self._db, self._owner, want, self._settings.lease_s
        )
        self._metrics.takeovers("delivery", (delivery.previous_owner for delivery in claimed))
        return claimed

    async def _start_batch(self, claimed: Sequence[store.ClaimedDelivery]) -> None:
        """Start what its host has room for, queue what it has room to wait for, and give the
        rest back; a drain ends when every due delivery belongs to a host at its limit."""
        surplus: defaultdict[str, list[int]] = defaultdict(list)  # host -> claimed ids
        for delivery in claimed:
            if delivery.id in self._held:
                continue  # our own lease ran out while we held it; the first copy records
            offer = self._slots.offer(delivery.host, delivery)
            if offer is Offer.START:
                self._start(delivery)
            elif offer is Offer.WAIT:
                self._held.add(delivery.id)
            else:
                surplus[delivery.host].append(delivery.id)
        if surplus:
            # The host's whole due backlog goes back with them, in one statement: else
            # it would be claimed and given back again, delivery by delivery.
            await store.defer_hosts(
                self._db,
                self._owner,
                {
                    host: store.HostDeferral(ids, self._slots.defer_s(host))
                    for host, ids in surplus.items()
                },
            )

    def _start(self, delivery: store.ClaimedDelivery) -> None:
        self._held.add(delivery.id)
        self._spawn(delivery.id, self._deliver(delivery))

    def _finished(self, key: int) -> None:
        self._held.discard(key)

    async def _deliver(self, delivery: store.ClaimedDelivery) -> None:
        host = delivery.host
        duration_ms: int | None = None
        try:
            try:
                started_at = self._db.now()
                started = time.monotonic()
                headers = callback_headers(delivery, int(started_at.timestamp()))
                sent = await self._sender.post(
                    delivery.callback_url,
                    headers,
                    delivery.body,
                    self._settings.delivery_timeout_s,
                )
                duration_ms = int((time.monotonic() - started) * 1000)
            finally:
                # The receiver has answered (or failed): its slot goes to the host's next
                # delivery while this one's attempt is being recorded.
                following = self._slots.release(
                    host, None if duration_ms is None else duration_ms / 1000
                )
                if following is not None:
                    self._start(following)
            retry_after_s = parse_retry_after(sent.retry_after, time.time())
            decision = decide(
                Outcome(
                    status_code=sent.status_code, error=sent.error, retry_after_s=retry_after_s
                ),
                attempt=delivery.attempts + 1,
                schedule_s=self._settings.delivery_retry_schedule_s,
                rand=self._rand,
            )
            since_queued = self._db.now() - delivery.queued_at
            self._metrics.attempt(
                sent.status_code, sent.error, duration_ms, decision.action, since_queued
            )
            retry_at = None
            if decision.action == "retry":
                assert decision.delay_s is not None
                retry_at = self._db.now() + timedelta(seconds=decision.delay_s)
            if decision.action != "done":
                logger.info(
                    "callback %s to %s: %s (%s)",
                    delivery.webhook_id,
                    host,
                    decision.action,
                    decision.reason,
                    extra=attempt_fields(delivery, sent.status_code, duration_ms, decision.action),
                )
            await self._records.submit(
                store.AttemptRecord(
                    delivery_id=delivery.id,
                    subscription_id=delivery.subscription_id,
                    webhook_id=delivery.webhook_id,
                    event=delivery.event,
                    attempt_number=delivery.subscription_attempts + 1,
                    started_at=started_at,
                    duration_ms=duration_ms,
                    status_code=sent.status_code,
                    error=sent.error,
                    response_excerpt=sent.excerpt,
                    action=decision.action,
                    retry_at=retry_at,
                )
            )
        except Exception as exc:
            # The lease runs out and the delivery is tried again: nothing is lost.
            report_failure(logger, exc, self._outage, self.work, "delivery %s failed", delivery.id)

    async def _write_records(self, records: Sequence[store.AttemptRecord]) -> list[None]:
        await store.record_attempts(self._db, self._owner, records)
        return [None] * len(records)

    async def renew_leases(self) -> None:
        await store.renew_delivery_leases(
            self._db, self._owner, self.in_flight_ids, self._settings.lease_s
        )

    async def _give_back_held(self) -> None:
        """Closing: deliveries waiting for their host go back to the table, due now."""
        waiting = [d.id for d in self._slots.take_waiting()]
        self._held.difference_update(waiting)
        if waiting:
            await store.release_deliveries(self._db, self._owner, waiting)
