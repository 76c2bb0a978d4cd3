"""Delivering callbacks: claim due deliveries, POST them signed, record every attempt.

The outbox is the `deliveries` table: rows are written in the transaction that records a
final result, leased here like polls are, and released with the attempt's record. Many
callbacks are in flight at once, bounded overall and per receiver host: a receiver that hangs
until the timeout holds at most `RELAY_DELIVERY_PER_HOST` slots (and as many claimed ones
wait for them); when more of its deliveries are claimed, they and the rest of its due backlog
are given back to the table in one statement (deferred) for about the time its queue here
takes to drain, so healthy receivers keep their rate and a dead receiver's backlog is not
claimed over and over.

The HTTP client is aiohttp, chosen by measurement (docs/benchmarks.md): stock httpx slows to a
few hundred POSTs/s with many in flight. The sender is the seam: `CallbackSender` can be
replaced in tests. The default sender connects only to vetted addresses (see addresses.py).
This module never writes SQL; the retry policy lives in retry.py.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

from relay import __version__, store
from relay.addresses import BlockedAddressError
from relay.batching import Batcher
from relay.config import Settings
from relay.database import Database
from relay.draining import Drainer
from relay.resolver import VettingResolver
from relay.retry import Outcome, decide, parse_retry_after
from relay.signing import sign

logger = logging.getLogger(__name__)

EXCERPT_BYTES = 2048
CLAIM_BATCH_MAX = 200
DEFER_MIN_S = 0.1
DEFER_MAX_S = 60.0
USER_AGENT = f"relay/{__version__}"


@dataclass(frozen=True)
class SendResult:
    status_code: int | None
    error: str | None = None
    excerpt: str | None = None
    retry_after: str | None = None


class CallbackSender(Protocol):
    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float
    ) -> SendResult: ...

    async def aclose(self) -> None: ...


class AiohttpSender:
    """POSTs with aiohttp; never follows redirects, reads at most EXCERPT_BYTES of an answer."""

    def __init__(self, *, allow_private: bool, limit: int, limit_per_host: int) -> None:
        self._limit = limit
        self._limit_per_host = limit_per_host
        self._resolver = VettingResolver(allow_private=allow_private)
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._limit,
                limit_per_host=self._limit_per_host,
                resolver=self._resolver,
                ttl_dns_cache=10,
            )
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        return self._session

    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float
    ) -> SendResult:
        try:
            # aiohttp does not ask the resolver about literal IPs: vet those here.
            self._resolver.check_literal(urlsplit(url).hostname or "")
        except BlockedAddressError as exc:
            return SendResult(status_code=None, error=str(exc))
        try:
            async with self._get_session().post(
                url,
                data=body,
                headers=dict(headers),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as response:
                excerpt = await response.content.read(EXCERPT_BYTES)
                return SendResult(
                    status_code=response.status,
                    excerpt=excerpt.decode("utf-8", "replace") or None,
                    retry_after=response.headers.get("retry-after"),
                )
        except TimeoutError:
            return SendResult(status_code=None, error=f"timed out after {timeout_s:g} s")
        except aiohttp.ClientConnectorError as exc:
            return SendResult(status_code=None, error=f"connection failed: {exc.os_error or exc}")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return SendResult(status_code=None, error=f"{type(exc).__name__}: {exc}"[:300])

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def callback_headers(delivery: store.ClaimedDelivery, timestamp: int) -> dict[str, str]:
    """The headers of one attempt: re-signed per attempt, same webhook-id on every one."""
    return {
        "content-type": "application/json",
        "webhook-id": delivery.webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(
            delivery.signing_secret, delivery.webhook_id, timestamp, delivery.body
        ),
        "relay-event": delivery.event,
        "relay-subscription-id": delivery.subscription_id,
        "relay-attempt": str(delivery.subscription_attempts + 1),
        "user-agent": USER_AGENT,
    }


class Deliverer(Drainer):
    """Drains due deliveries; `tick()` is what the scheduler (or a final result) calls."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        sender: CallbackSender,
        owner: str,
        *,
        rand: Callable[[], float] = random.random,
    ) -> None:
        super().__init__()
        self._db = db
        self._settings = settings
        self._sender = sender
        self._owner = owner
        self._rand = rand
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        # Claimed deliveries waiting for a slot of their host, at most `per_host` per host;
        # their leases are renewed like those in flight.
        self._waiting: defaultdict[str, deque[store.ClaimedDelivery]] = defaultdict(deque)
        self._waiting_count = 0
        self._per_host: defaultdict[str, int] = defaultdict(int)
        self._host_latency_s: dict[str, float] = {}  # moving average of attempt durations
        self._host_saturated_since: dict[str, float] = {}  # monotonic time it hit its limit
        self._held: set[int] = set()  # ids in flight or waiting: never queued twice
        self._slot_freed = asyncio.Event()
        self._records: Batcher[store.AttemptRecord, None] = Batcher(self._write_records)

    @property
    def in_flight_ids(self) -> list[int]:
        """Every delivery this process holds a lease on: sending or waiting for its host."""
        waiting = [d.id for queue in self._waiting.values() for d in queue]
        return [*self._in_flight, *waiting]

    async def _drain(self) -> None:
        """Claim while there is room; stop when nothing is due or every due delivery belongs
        to a host already at its limit (those go back to the table for a moment)."""
        concurrency = self._settings.delivery_concurrency
        per_host = self._settings.delivery_per_host
        # Claim in batches: one claim per freed slot would run the claim query per callback.
        min_claim = max(1, min(CLAIM_BATCH_MAX, concurrency) // 4)
        while not self._closing:
            free = concurrency - len(self._in_flight) - self._waiting_count
            if free <= 0 or (free < min_claim and self._in_flight):
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            want = min(free, CLAIM_BATCH_MAX)
            claimed = await store.claim_due_deliveries(
                self._db, self._owner, want, self._settings.lease_s
            )
            surplus: defaultdict[str, list[int]] = defaultdict(list)  # host -> claimed ids
            for delivery in claimed:
                if delivery.id in self._held:
                    continue  # our own lease ran out while we held it; the first copy records
                host = delivery.host
                if self._per_host[host] < per_host:
                    self._start(delivery, host)
                elif len(self._waiting[host]) < per_host:
                    self._waiting[host].append(delivery)
                    self._waiting_count += 1
                    self._held.add(delivery.id)
                else:
                    surplus[host].append(delivery.id)
            if surplus:
                # The host's whole due backlog goes back with them, in one statement: else
                # it would be claimed and given back again, delivery by delivery.
                await store.defer_hosts(
                    self._db,
                    self._owner,
                    {
                        host: store.HostDeferral(ids, self._defer_s(host))
                        for host, ids in surplus.items()
                    },
                )
            if len(claimed) < want:
                return

    def _defer_s(self, host: str) -> float:
        """How long to give a saturated host's deliveries back for: about the time its queue
        here takes to drain, so a slow receiver's backlog does not come back to the front
        of the table every second ahead of healthy receivers, while a fast receiver's comes
        back in a moment. A host that hangs has finished nothing to average: it has taken at
        least as long as it has been at its limit, so its delay doubles each time it comes
        back still stuck."""
        per_host = self._settings.delivery_per_host
        queued = self._per_host[host] + len(self._waiting[host])
        latency_s = self._host_latency_s.get(host, 0.0)
        saturated_since = self._host_saturated_since.get(host)
        if saturated_since is not None:
            latency_s = max(latency_s, time.monotonic() - saturated_since)
        drain_s = queued / per_host * latency_s
        return min(max(DEFER_MIN_S, drain_s), DEFER_MAX_S) * (0.8 + 0.4 * self._rand())

    def _start(self, delivery: store.ClaimedDelivery, host: str) -> None:
        self._per_host[host] += 1
        if self._per_host[host] >= self._settings.delivery_per_host:
            self._host_saturated_since.setdefault(host, time.monotonic())
        self._held.add(delivery.id)
        self._in_flight[delivery.id] = asyncio.create_task(self._deliver(delivery, host))

    def _release_host(self, host: str, duration_s: float | None) -> None:
        """The receiver has answered (or failed): its slot goes to the host's next delivery
        while this one's attempt is being recorded."""
        if duration_s is not None:
            previous = self._host_latency_s.get(host, duration_s)
            self._host_latency_s[host] = 0.8 * previous + 0.2 * duration_s
        self._per_host[host] -= 1
        self._host_saturated_since.pop(host, None)
        queue = self._waiting.get(host)
        if queue:
            self._waiting_count -= 1
            self._start(queue.popleft(), host)
            if not queue:
                del self._waiting[host]
        elif self._per_host[host] <= 0:
            del self._per_host[host]
            self._host_latency_s.pop(host, None)  # forget hosts no longer in use

    def _finished(self, delivery_id: int) -> None:
        self._in_flight.pop(delivery_id, None)
        self._held.discard(delivery_id)
        self._slot_freed.set()

    async def _deliver(self, delivery: store.ClaimedDelivery, host: str) -> None:
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
                self._release_host(host, None if duration_ms is None else duration_ms / 1000)
            retry_after_s = parse_retry_after(sent.retry_after, time.time())
            decision = decide(
                Outcome(
                    status_code=sent.status_code, error=sent.error, retry_after_s=retry_after_s
                ),
                attempt=delivery.attempts + 1,
                schedule_s=self._settings.delivery_retry_schedule_s,
                rand=self._rand,
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
        except Exception:
            # The lease runs out and the delivery is tried again: nothing is lost.
            logger.exception("delivery %s failed unexpectedly", delivery.id)
        finally:
            self._finished(delivery.id)

    async def _write_records(self, records: Sequence[store.AttemptRecord]) -> list[None]:
        await store.record_attempts(self._db, self._owner, records)
        return [None] * len(records)

    async def renew_leases(self) -> None:
        await store.renew_delivery_leases(
            self._db, self._owner, self.in_flight_ids, self._settings.lease_s
        )

    async def close(self) -> None:
        """Stop claiming, hand waiting deliveries back, let those in flight finish."""
        self._closing = True
        self._slot_freed.set()
        waiting = [d.id for queue in self._waiting.values() for d in queue]
        self._waiting.clear()
        self._waiting_count = 0
        self._held.difference_update(waiting)
        if waiting:
            await store.release_deliveries(self._db, self._owner, waiting)
        tasks = list(self._in_flight.values())
        if tasks:
            await asyncio.wait(tasks, timeout=self._settings.delivery_timeout_s + 1)
        await self._records.drain()
