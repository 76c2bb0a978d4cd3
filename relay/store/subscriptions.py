"""Subscriptions, the API's side after a create: get, list, cancel, list attempts, redeliver.

Owns those reads and the writes a cancel or a redelivery makes to the subscription and its
deliveries. Creates are creates.py's, idling a generation nobody watches any more is
generations.py's, what an attempt writes is attempts.py's. Every call is scoped to the
calling key.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, Select, insert, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.database import Database
from relay.models import (
    CallbackEvent,
    DeliveryStatus,
    SubscriptionStatus,
    deliveries,
    delivery_attempts,
    generations,
    subscriptions,
)
from relay.store._sql import cancel_deliveries, delivery_row, retrying
from relay.store.generations import idle_if_unwatched

SUBSCRIPTION_COLUMNS = (
    subscriptions.c.id,
    subscriptions.c.generation_id,
    subscriptions.c.callback_url,
    subscriptions.c.metadata,
    subscriptions.c.status,
    generations.c.status.label("generation_status"),
    subscriptions.c.attempts,
    subscriptions.c.last_error,
    subscriptions.c.created_at,
    subscriptions.c.updated_at,
    subscriptions.c.delivered_at,
)


def _subscription_view(*where: ColumnElement[bool]) -> Select[tuple[object, ...]]:
    """Subscriptions as the API shows them: with their generation's last upstream status."""
    return (
        select(*SUBSCRIPTION_COLUMNS)
        .join(generations, generations.c.id == subscriptions.c.generation_id)
        .where(*where)
    )


async def _one_subscription(conn: AsyncConnection, sub_id: str) -> RowMapping:
    return (await conn.execute(_subscription_view(subscriptions.c.id == sub_id))).mappings().one()


def _owned(key_id: str, sub_id: str) -> ColumnElement[bool]:
    return (subscriptions.c.id == sub_id) & (subscriptions.c.api_key_id == key_id)


async def _generation_of(conn: AsyncConnection, key_id: str, sub_id: str) -> str | None:
    """The subscription's generation id; None if the subscription is not this key's."""
    query = select(subscriptions.c.generation_id).where(_owned(key_id, sub_id))
    return (await conn.execute(query)).scalar_one_or_none()


async def get_subscription(db: Database, key_id: str, sub_id: str) -> RowMapping | None:
    async with db.reader() as conn:
        return (await conn.execute(_subscription_view(_owned(key_id, sub_id)))).mappings().first()


async def list_subscriptions(
    db: Database,
    key_id: str,
    *,
    status: str | None,
    generation_id: str | None,
    limit: int,
    before_id: str | None,
) -> tuple[list[RowMapping], bool]:
    """Newest first (ids sort by creation time); returns (rows, whether more exist)."""
    query = (
        _subscription_view(subscriptions.c.api_key_id == key_id)
        .order_by(subscriptions.c.id.desc())
        .limit(limit + 1)
    )
    if status is not None:
        query = query.where(subscriptions.c.status == status)
    if generation_id is not None:
        query = query.where(subscriptions.c.generation_id == generation_id)
    if before_id is not None:
        query = query.where(subscriptions.c.id < before_id)
    async with db.reader() as conn:
        rows = list((await conn.execute(query)).mappings())
    return rows[:limit], len(rows) > limit


async def cancel_subscription(db: Database, key_id: str, sub_id: str) -> RowMapping | None:
    """Cancel an active subscription (a final one stays as it was); None if not this key's.

    Stops polling its generation when no active subscription remains.
    """
    return await retrying(lambda: _cancel_once(db, key_id, sub_id))


async def _cancel_once(db: Database, key_id: str, sub_id: str) -> RowMapping | None:
    now = db.now()
    pending = (deliveries.c.subscription_id == sub_id) & (
        deliveries.c.status == DeliveryStatus.PENDING
    )
    async with db.transaction() as conn:
        gen_id = await _generation_of(conn, key_id, sub_id)
        if gen_id is None:
            return None
        if db.is_postgres:
            # Lock order: generation, then deliveries, then subscription (as every writer).
            await conn.execute(
                select(generations.c.id).where(generations.c.id == gen_id).with_for_update()
            )
            await conn.execute(
                select(deliveries.c.id).where(pending).order_by(deliveries.c.id).with_for_update()
            )
        changed = await conn.execute(
            update(subscriptions)
            .where(
                subscriptions.c.id == sub_id, subscriptions.c.status == SubscriptionStatus.ACTIVE
            )
            .values(status=SubscriptionStatus.CANCELED, updated_at=now)
        )
        if changed.rowcount:
            await cancel_deliveries(conn, pending, now)
            await idle_if_unwatched(conn, gen_id, now)
        return await _one_subscription(conn, sub_id)


async def list_attempts(db: Database, key_id: str, sub_id: str) -> list[RowMapping] | None:
    """Oldest first; None if the subscription is not this key's."""
    async with db.reader() as conn:
        if await _generation_of(conn, key_id, sub_id) is None:
            return None
        query = (
            select(
                delivery_attempts.c.attempt,
                delivery_attempts.c.webhook_id,
                delivery_attempts.c.started_at,
                delivery_attempts.c.duration_ms,
                delivery_attempts.c.status_code,
                delivery_attempts.c.error,
                delivery_attempts.c.response_excerpt,
            )
            .where(delivery_attempts.c.subscription_id == sub_id)
            .order_by(delivery_attempts.c.id)
        )
        return list((await conn.execute(query)).mappings())


class RedeliverConflict(Exception):
    """Nothing to redeliver; the message says why."""


async def redeliver(db: Database, key_id: str, sub_id: str) -> RowMapping | None:
    """Queue the stored final message again, with the same webhook-id.

    None if the subscription is not this key's; RedeliverConflict if there is nothing to send.
    A delivery still pending is made due now instead of being doubled. The subscription
    becomes `active` with a fresh `updated_at` until the new delivery ends (then
    `delivered`, `failed` or `expired` as that delivery goes; `delivered_at` keeps the
    first delivery's time until another succeeds).
    """
    return await retrying(lambda: _redeliver_once(db, key_id, sub_id))


async def _redeliver_once(db: Database, key_id: str, sub_id: str) -> RowMapping | None:
    now = db.now()
    async with db.transaction() as conn:
        sub = (
            await conn.execute(
                select(
                    subscriptions.c.id, subscriptions.c.status, subscriptions.c.callback_url
                ).where(_owned(key_id, sub_id))
            )
        ).first()
        if sub is None:
            return None
        if sub.status == SubscriptionStatus.CANCELED:
            raise RedeliverConflict("the subscription is canceled")
        # Deliveries before subscriptions: the lock order attempt recording uses.
        last_query = (
            select(deliveries)
            .where(deliveries.c.subscription_id == sub_id)
            .order_by(deliveries.c.id.desc())
            .limit(1)
        )
        if db.is_postgres:
            last_query = last_query.with_for_update()
        last = (await conn.execute(last_query)).mappings().first()
        if last is None:
            raise RedeliverConflict("the generation has no final result yet")
        if last["status"] == DeliveryStatus.PENDING:
            # Waiting for a retry: make it due now. Leased (being sent): nothing to add.
            await conn.execute(
                update(deliveries)
                .where(
                    deliveries.c.id == last["id"],
                    deliveries.c.status == DeliveryStatus.PENDING,
                    deliveries.c.lease_owner.is_(None),
                )
                .values(next_attempt_at=now, updated_at=now)
            )
        else:
            event = CallbackEvent(last["event"])
            row = delivery_row(sub_id, sub.callback_url, event, last["payload"], now)
            row["webhook_id"] = last["webhook_id"]
            await conn.execute(insert(deliveries).values(**row))
        try:
            # Active again, with a fresh updated_at, until the new delivery ends: pruning
            # (which counts retention from updated_at) cannot take it meanwhile.
            await conn.execute(
                update(subscriptions)
                .where(subscriptions.c.id == sub_id)
                .values(status=SubscriptionStatus.ACTIVE, updated_at=now)
            )
        except IntegrityError:
            raise RedeliverConflict(
                "another active subscription of this key has the same generation and callback URL"
            ) from None
        return await _one_subscription(conn, sub_id)
