"""The operator's numbers: the backlog for /metrics, and what /dashboard and `relay stats` show.

Read-only, across every key, cluster-wide (every node reads the same rows, so every node shows
the same numbers). Each query is bounded by an index: counts by status and state read their
indexes, the pending backlog its partial index, recent failures the partial index of failed
attempts, the chart the index on `started_at`, and only for the minutes asked for. Callers
cache the answers for a few seconds (admin.py): a scrape storm or many open dashboards must
not hammer the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select, text
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from relay import models
from relay.database import Database
from relay.models import FAILED_ATTEMPT, DeliveryStatus, deliveries, generations, subscriptions
from relay.models import delivery_attempts as attempts


@dataclass(frozen=True)
class Backlog:
    """What is waiting, cluster-wide."""

    pending_generations: int  # generations being polled
    pending_deliveries: int  # callbacks waiting for their first attempt or a retry
    oldest_pending_delivery_at: datetime | None  # when the oldest of them was queued

    def oldest_age_s(self, now: datetime) -> float:
        if self.oldest_pending_delivery_at is None:
            return 0.0
        return max(0.0, (now - self.oldest_pending_delivery_at).total_seconds())


async def backlog(db: Database) -> Backlog:
    """Pending generations and deliveries, and when the oldest pending delivery was queued."""
    async with db.reader() as conn:
        polling = (
            await conn.execute(
                select(func.count())
                .select_from(generations)
                .where(generations.c.state == models.GenerationState.POLLING)
            )
        ).scalar_one()
        pending, oldest = (
            await conn.execute(
                select(func.count(), func.min(deliveries.c.created_at)).where(
                    deliveries.c.status == DeliveryStatus.PENDING
                )
            )
        ).one()
    # min() takes its column's type, so the time comes back aware on both databases.
    return Backlog(int(polling), int(pending), oldest)


# --- The dashboard's and `relay stats`'s numbers --------------------------------------------------

TOP_HOSTS = 10
RECENT_FAILURES = 15


@dataclass(frozen=True)
class HostBacklog:
    """A receiver with pending callbacks: how many, since when, and its last error."""

    host: str
    pending: int
    oldest_at: datetime
    last_error: str | None


@dataclass(frozen=True)
class Failure:
    """One attempt that got no 2xx."""

    subscription_id: str
    webhook_id: str
    attempt: int
    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str | None
    host: str | None


@dataclass(frozen=True)
class PollLoad:
    """Polling now: how many generations, how many due, how many polled in the last minute,
    and those whose last poll failed, by why."""

    polling: int
    due: int
    polled_last_minute: int
    failing: dict[str, int]  # rate_limited, unauthorized, not_found, error


@dataclass(frozen=True)
class Overview:
    at: datetime
    subscriptions: dict[str, int]  # by status, every status present
    generations: dict[str, int]  # by state, every state present
    backlog: Backlog
    oldest_delivery: RowMapping | None  # the oldest pending delivery
    hosts: list[HostBacklog]
    failures: list[Failure]
    polls: PollLoad


def _counts(rows: Any, words: Any) -> dict[str, int]:
    counts = {str(word): 0 for word in words}
    for word, count in rows:
        counts[str(word)] = int(count)
    return counts


_LAST_ERROR_KIND = case(
    (generations.c.last_error.like("upstream answered HTTP 429%"), "rate_limited"),
    (generations.c.last_error.like("upstream answered HTTP 401%"), "unauthorized"),
    (generations.c.last_error.like("upstream answered HTTP 403%"), "unauthorized"),
    (generations.c.last_error.like("upstream answered HTTP 404%"), "not_found"),
    else_="error",
)


async def overview(db: Database) -> Overview:
    """Everything the dashboard's first screen shows, read in one connection."""
    now = db.now()
    minute_ago = now - timedelta(seconds=60)
    pending = deliveries.c.status == DeliveryStatus.PENDING
    polling = generations.c.state == models.GenerationState.POLLING
    async with db.reader() as conn:
        subs = _counts(
            await conn.execute(
                select(subscriptions.c.status, func.count()).group_by(subscriptions.c.status)
            ),
            models.SubscriptionStatus,
        )
        gens = _counts(
            await conn.execute(
                select(generations.c.state, func.count()).group_by(generations.c.state)
            ),
            models.GenerationState,
        )
        count, oldest_at = (
            await conn.execute(
                select(func.count(), func.min(deliveries.c.created_at)).where(pending)
            )
        ).one()
        oldest = (
            (
                await conn.execute(
                    select(deliveries).where(pending, deliveries.c.created_at == oldest_at).limit(1)
                )
            )
            .mappings()
            .first()
            if oldest_at is not None
            else None
        )
        hosts = await _top_hosts(conn)
        failures = await _recent_failures(conn)
        due = (
            await conn.execute(
                select(func.count())
                .select_from(generations)
                .where(generations.c.next_poll_at <= now)
            )
        ).scalar_one()
        polled = (
            await conn.execute(
                select(func.count())
                .select_from(generations)
                .where(
                    # by (state, updated_at): a poll's record sets updated_at to its time
                    generations.c.state.in_(list(models.GenerationState)),
                    generations.c.updated_at >= minute_ago,
                    generations.c.last_polled_at >= minute_ago,
                )
            )
        ).scalar_one()
        failing = _counts(
            await conn.execute(
                select(_LAST_ERROR_KIND, func.count())
                .where(polling, generations.c.error_count > 0)
                .group_by(_LAST_ERROR_KIND)
            ),
            ("rate_limited", "unauthorized", "not_found", "error"),
        )
    return Overview(
        at=now,
        subscriptions=subs,
        generations=gens,
        backlog=Backlog(gens[models.GenerationState.POLLING], int(count), oldest_at),
        oldest_delivery=oldest,
        hosts=hosts,
        failures=failures,
        polls=PollLoad(gens[models.GenerationState.POLLING], int(due), int(polled), failing),
    )


async def _top_hosts(conn: AsyncConnection) -> list[HostBacklog]:
    """The receivers with the most pending callbacks, each with its latest error."""
    pending = deliveries.c.status == DeliveryStatus.PENDING
    rows = (
        await conn.execute(
            select(deliveries.c.host, func.count(), func.min(deliveries.c.created_at))
            .where(pending, deliveries.c.host.is_not(None))
            .group_by(deliveries.c.host)
            .order_by(func.count().desc(), deliveries.c.host)
            .limit(TOP_HOSTS)
        )
    ).all()
    hosts = []
    for host, count, oldest_at in rows:
        # The partial index (host, next_attempt_at): the latest retry carries the latest error.
        last_error = (
            await conn.execute(
                select(deliveries.c.last_error)
                .where(pending, deliveries.c.host == host, deliveries.c.last_error.is_not(None))
                .order_by(deliveries.c.next_attempt_at.desc())
                .limit(1)
            )
        ).scalar_one_or_none()
        hosts.append(HostBacklog(host, int(count), oldest_at, last_error))
    return hosts


async def _recent_failures(conn: AsyncConnection) -> list[Failure]:
    latest = (
        select(attempts)
        .where(text(FAILED_ATTEMPT))  # the partial index ix_delivery_attempts_failed
        .order_by(attempts.c.id.desc())
        .limit(RECENT_FAILURES)
        .subquery()
    )
    rows = await conn.execute(
        select(
            latest.c.subscription_id,
            latest.c.webhook_id,
            latest.c.attempt,
            latest.c.started_at,
            latest.c.duration_ms,
            latest.c.status_code,
            latest.c.error,
            deliveries.c.host,
        )
        .outerjoin(deliveries, deliveries.c.id == latest.c.delivery_id)
        .order_by(latest.c.id.desc())
    )
    return [Failure(*row) for row in rows]


async def attempts_per_minute(db: Database, since: datetime) -> dict[datetime, tuple[int, int]]:
    """Callback attempts started since `since`, by minute: (delivered, failed)."""
    started = attempts.c.started_at
    if db.is_postgres:
        minute: Any = func.date_trunc("minute", started)
    else:
        minute = func.strftime("%Y-%m-%d %H:%M:00", started)
    ok = attempts.c.status_code.between(200, 299)
    query = (
        select(
            minute.label("minute"),
            func.sum(case((ok, 1), else_=0)),
            func.sum(case((ok, 0), else_=1)),
        )
        .where(started >= since)  # ix_delivery_attempts_started_at
        .group_by(minute)
    )
    async with db.reader() as conn:
        rows = (await conn.execute(query)).all()
    counts = {}
    for at, delivered, failed in rows:
        when = at if isinstance(at, datetime) else datetime.fromisoformat(str(at))
        counts[when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)] = (
            int(delivered),
            int(failed),
        )
    return counts
