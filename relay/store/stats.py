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
from datetime import datetime

from sqlalchemy import func, select

from relay.database import Database
from relay.models import DeliveryStatus, GenerationState, deliveries, generations


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
                .where(generations.c.state == GenerationState.POLLING)
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
