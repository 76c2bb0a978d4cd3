"""States for benchmarks and tests, written straight into the tables, and read back.

Bulk rows that the service would take long to reach through its API (100,000 polling
generations with a subscriber each, a backlog of final results), and the schedule and lease
states a test sets up on single deliveries. The service itself never calls these; they exist
so that nothing outside relay.store writes SQL, benchmarks and tests included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.database import Database
from relay.models import GenerationState, deliveries, generations, subscriptions
from relay.store._sql import insert_rows, retrying
from relay.store.creates import new_generation_row, new_subscription_row

BATCH = 5000  # rows per INSERT: bounds one statement's parameters, however many are seeded


async def _insert_in_batches(
    conn: AsyncConnection, table: Table, rows: Sequence[Mapping[str, Any]], postgres: bool
) -> None:
    for start in range(0, len(rows), BATCH):
        await insert_rows(conn, table, rows[start : start + BATCH], postgres)


async def add_polling_generations(
    db: Database,
    key_id: str,
    callback_urls: Mapping[str, str],
    *,
    status: str,
    next_poll_at: datetime,
) -> None:
    """Generations being polled, each with one active subscription of key `key_id`
    (generation id → callback URL), last seen upstream with `status`, next polled at
    `next_poll_at`; in one transaction."""
    now = db.now()
    polling = [
        {**new_generation_row(gen_id, now, key_id), "status": status, "next_poll_at": next_poll_at}
        for gen_id in callback_urls
    ]
    subscribed = [
        new_subscription_row(key_id, gen_id, url, None, now)
        for gen_id, url in callback_urls.items()
    ]
    async with db.transaction() as conn:
        await _insert_in_batches(conn, generations, polling, db.is_postgres)
        await _insert_in_batches(conn, subscriptions, subscribed, db.is_postgres)


async def add_final_generations(
    db: Database, results: Mapping[str, str], *, status: str = "COMPLETED"
) -> None:
    """Generations already final upstream with `status` (generation id → the result body as
    upstream sent it) that nobody subscribes to yet: a subscription to one is a late
    registration, its delivery queued at once."""
    now = db.now()
    final = [
        {
            "id": gen_id,
            "state": GenerationState.FINAL,
            "status": status,
            "result": result,
            "first_subscribed_at": now,
            "final_at": now,
            "created_at": now,
            "updated_at": now,
        }
        for gen_id, result in results.items()
    ]
    async with db.transaction() as conn:
        await _insert_in_batches(conn, generations, final, db.is_postgres)


async def schedule_all_polls(db: Database, next_poll_at: datetime) -> None:
    """Every polling generation next polled at `next_poll_at` and leased by nobody (all due
    now, or none for an hour). Retried when it deadlocks with a running relay's sweep (this
    UPDATE takes the rows in table order, a sweep in id order)."""

    async def work() -> None:
        async with db.transaction() as conn:
            await conn.execute(
                update(generations)
                .where(generations.c.state == GenerationState.POLLING)
                .values(next_poll_at=next_poll_at, lease_owner=None)
            )

    await retrying(work)


async def delivery_ids_by_generation(db: Database) -> dict[str, int]:
    """Each generation's delivery id, for generations that have one delivery."""
    query = select(subscriptions.c.generation_id, deliveries.c.id).join(
        deliveries, deliveries.c.subscription_id == subscriptions.c.id
    )
    async with db.reader() as conn:
        return {gen_id: delivery_id for gen_id, delivery_id in await conn.execute(query)}


@dataclass(frozen=True)
class DeliverySchedule:
    next_attempt_at: datetime | None
    lease_owner: str | None
    host: str | None


async def delivery_schedules(db: Database) -> dict[int, DeliverySchedule]:
    """Every delivery's due time, lease owner and host, by id."""
    query = select(
        deliveries.c.id, deliveries.c.next_attempt_at, deliveries.c.lease_owner, deliveries.c.host
    )
    async with db.reader() as conn:
        return {
            row.id: DeliverySchedule(row.next_attempt_at, row.lease_owner, row.host)
            for row in await conn.execute(query)
        }


async def schedule_delivery(
    db: Database, delivery_id: int, next_attempt_at: datetime, lease_owner: str | None = None
) -> None:
    """One delivery due at `next_attempt_at`; with `lease_owner`, leased by it until then
    (a lease in the past has run out while its holder may still be sending)."""
    async with db.transaction() as conn:
        await conn.execute(
            update(deliveries)
            .where(deliveries.c.id == delivery_id)
            .values(next_attempt_at=next_attempt_at, lease_owner=lease_owner)
        )


async def forget_delivery_host(db: Database, delivery_id: int) -> None:
    """One delivery without its host, as a node older than the host column wrote it."""
    async with db.transaction() as conn:
        await conn.execute(
            update(deliveries).where(deliveries.c.id == delivery_id).values(host=None)
        )
