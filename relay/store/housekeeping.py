"""Housekeeping: prune finished subscriptions, their deliveries and attempts, and finished
generations nobody subscribes to, once they are older than the retention period; push hints
nobody came for, and accepted webhook ids, once they cannot matter any more; and
Idempotency-Keys past their 24 hours (idempotency.py's own pruning, called from here).

Owns deleting old rows. Never touches an active subscription, one with a pending delivery,
or a polling generation; one node prunes at a time (an advisory lock on PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import delete, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.database import Database
from relay.models import (
    DeliveryStatus,
    GenerationState,
    SubscriptionStatus,
    deliveries,
    delivery_attempts,
    generations,
    subscriptions,
    upstream_hints,
    upstream_webhooks,
)
from relay.store._sql import any_of
from relay.store.idempotency import prune_idempotency_keys

PRUNE_LOCK_ID = 0x72656C6170  # advisory lock: one pruning node at a time


async def prune(db: Database, older_than_s: float, batch: int = 500) -> int:
    """Delete finished subscriptions (and their deliveries and attempts) and finished
    generations older than the retention period, in batches; one node at a time.
    Returns the number of subscriptions deleted."""
    await prune_idempotency_keys(db, db.now())
    cutoff = db.now() - timedelta(seconds=older_than_s)
    total = 0
    while True:
        async with db.transaction() as conn:
            if db.is_postgres:
                got = (
                    await conn.execute(
                        text("SELECT pg_try_advisory_xact_lock(:id)"), {"id": PRUNE_LOCK_ID}
                    )
                ).scalar_one()
                if not got:
                    return total
            ids = await _prune_subscriptions(conn, cutoff, batch, db.is_postgres)
            gen_ids: Sequence[str] = []
            if not ids:
                gen_ids = await _prune_generations(conn, cutoff, batch, db.is_postgres)
        total += len(ids)
        if not ids and not gen_ids:
            return total


async def _prune_subscriptions(
    conn: AsyncConnection, cutoff: datetime, batch: int, postgres: bool
) -> Sequence[str]:
    """Delete a batch of finished subscriptions with their deliveries and attempts."""
    finished = (
        subscriptions.c.status != SubscriptionStatus.ACTIVE,
        subscriptions.c.updated_at < cutoff,
        # Never one with a delivery still to send (a redelivery of an old subscription).
        ~select(deliveries.c.id)
        .where(
            deliveries.c.subscription_id == subscriptions.c.id,
            deliveries.c.status == DeliveryStatus.PENDING,
        )
        .exists(),
    )
    # Locked, so a redelivery cannot revive one of them while it is being deleted.
    ids = (
        (
            await conn.execute(
                select(subscriptions.c.id)
                .where(*finished)
                .limit(batch)
                .with_for_update(skip_locked=True)
            )
        )
        .scalars()
        .all()
    )
    if ids:
        await conn.execute(
            delete(delivery_attempts).where(
                any_of(delivery_attempts.c.subscription_id, ids, postgres)
            )
        )
        await conn.execute(
            delete(deliveries).where(any_of(deliveries.c.subscription_id, ids, postgres))
        )
        # Re-checked here: a redelivery may have made one active since the select.
        await conn.execute(
            delete(subscriptions).where(any_of(subscriptions.c.id, ids, postgres), *finished)
        )
    return ids


async def _prune_generations(
    conn: AsyncConnection, cutoff: datetime, batch: int, postgres: bool
) -> Sequence[str]:
    """Delete a batch of finished generations that no subscription refers to any more."""
    orphaned = (
        select(generations.c.id)
        .where(
            generations.c.state != GenerationState.POLLING,
            generations.c.updated_at < cutoff,
            ~select(subscriptions.c.id)
            .where(subscriptions.c.generation_id == generations.c.id)
            .exists(),
        )
        .limit(batch)
    )
    gen_ids = (await conn.execute(orphaned)).scalars().all()
    if gen_ids:
        await conn.execute(delete(generations).where(any_of(generations.c.id, gen_ids, postgres)))
    return gen_ids


async def prune_hints(
    db: Database, hints_older_than_s: float, webhook_ids_older_than_s: float, batch: int = 5000
) -> int:
    """Forget remembered hints past the hint memory, and accepted webhook ids past the time a
    repeat could still come, in batches. Returns how many rows went."""
    now = db.now()
    total = 0
    for table, column, age_s in (
        (upstream_hints, upstream_hints.c.received_at, hints_older_than_s),
        (upstream_webhooks, upstream_webhooks.c.received_at, webhook_ids_older_than_s),
    ):
        key = table.primary_key.columns.values()[0]
        old = select(key).where(column < now - timedelta(seconds=age_s)).limit(batch)
        while True:
            async with db.transaction() as conn:
                gone = (await conn.execute(delete(table).where(key.in_(old)))).rowcount
            total += gone
            if gone < batch:
                break
    return total
