"""Attempts, the worker's side: record each finished callback attempt and apply its decision
to the delivery and its subscription.

Owns `delivery_attempts` rows and what an attempt's outcome writes to `deliveries` and
`subscriptions`. The decision itself (done, retry, fail) is retry.py's; this module applies it
only while the delivery's lease is still the recorder's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Update, bindparam, case, func, insert, update

from relay.database import Database
from relay.models import (
    CallbackEvent,
    DeliveryStatus,
    SubscriptionStatus,
    UTCDateTime,
    deliveries,
    delivery_attempts,
    subscriptions,
)
from relay.store._leases import DELIVERY_LEASES
from relay.store._sql import retrying, storable

# What a held delivery becomes after an attempt, by the attempt's action (a retry stays
# pending).
DELIVERY_STATUS_BY_ACTION = {"done": DeliveryStatus.DELIVERED, "fail": DeliveryStatus.FAILED}


@dataclass(frozen=True)
class AttemptRecord:
    delivery_id: int
    subscription_id: str
    webhook_id: str
    event: CallbackEvent
    attempt_number: int  # the subscription-wide number sent as relay-attempt
    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str | None
    response_excerpt: str | None
    action: str  # done | retry | fail
    retry_at: datetime | None


async def _record_attempts_once(db: Database, owner: str, records: Sequence[AttemptRecord]) -> None:
    """Record finished attempts and apply their decisions, in one transaction.

    Each attempt row is kept even if the lease was lost (it happened); the delivery and the
    subscription change only while the lease is still ours.
    """
    if not records:
        return
    now = db.now()
    async with db.transaction() as conn:
        await conn.execute(
            insert(delivery_attempts),
            [
                {
                    "delivery_id": r.delivery_id,
                    "subscription_id": r.subscription_id,
                    "attempt": r.attempt_number,
                    "webhook_id": r.webhook_id,
                    "started_at": r.started_at,
                    "duration_ms": r.duration_ms,
                    "status_code": r.status_code,
                    "error": storable(r.error),
                    "response_excerpt": storable(r.response_excerpt),
                }
                for r in records
            ],
        )
        ids = [r.delivery_id for r in records]
        held = await DELIVERY_LEASES.held(conn, owner, ids, db.is_postgres)
        delivery_updates = []
        settled: list[dict[str, Any]] = []  # subscriptions whose delivery ended
        retried: list[dict[str, Any]] = []
        unheld: list[dict[str, Any]] = []
        for r in records:
            error = None if r.action == "done" else _error_text(r)
            if r.delivery_id in held:
                delivery_updates.append(
                    {
                        "d_id": r.delivery_id,
                        "d_status": DELIVERY_STATUS_BY_ACTION.get(r.action, DeliveryStatus.PENDING),
                        "d_next": r.retry_at if r.action == "retry" else None,
                        "d_error": error,
                    }
                )
            if r.delivery_id in held and r.action != "retry":
                if r.event == CallbackEvent.EXPIRED:
                    final_status = SubscriptionStatus.EXPIRED
                elif r.action == "done":
                    final_status = SubscriptionStatus.DELIVERED
                else:
                    final_status = SubscriptionStatus.FAILED
                settled.append(
                    {
                        "s_id": r.subscription_id,
                        "s_error": error,
                        "s_status": final_status,
                        "s_delivered_at": now if r.action == "done" else None,
                    }
                )
            elif r.delivery_id in held:
                retried.append({"s_id": r.subscription_id, "s_error": error})
            else:
                # The lease was lost: the attempt happened and is counted, but another node
                # owns the delivery now and its outcome is the one the subscription shows.
                unheld.append({"s_id": r.subscription_id})
        if delivery_updates:
            await conn.execute(
                update(deliveries)
                .where(deliveries.c.id == bindparam("d_id"), DELIVERY_LEASES.held_by(owner))
                .values(
                    attempts=deliveries.c.attempts + 1,
                    status=bindparam("d_status"),
                    next_attempt_at=bindparam("d_next"),
                    lease_owner=None,
                    last_error=bindparam("d_error"),
                    updated_at=now,
                ),
                delivery_updates,
            )
        settle = _count_attempt(
            updated_at=now,
            last_error=bindparam("s_error"),
            # Only an active subscription changes status: a canceled one stays so.
            status=case(
                (subscriptions.c.status == SubscriptionStatus.ACTIVE, bindparam("s_status")),
                else_=subscriptions.c.status,
            ),
            delivered_at=func.coalesce(
                bindparam("s_delivered_at", type_=UTCDateTime()), subscriptions.c.delivered_at
            ),
        )
        retry = _count_attempt(updated_at=now, last_error=bindparam("s_error"))
        for statement, rows in ((settle, settled), (retry, retried), (_count_attempt(), unheld)):
            if rows:
                await conn.execute(statement, rows)


def _count_attempt(**values: Any) -> Update:
    """One more attempt on subscription `s_id` (an executemany parameter), and `values`."""
    return (
        update(subscriptions)
        .where(subscriptions.c.id == bindparam("s_id"))
        .values(attempts=subscriptions.c.attempts + 1, **values)
    )


async def record_attempts(db: Database, owner: str, records: Sequence[AttemptRecord]) -> None:
    """Record finished attempts and apply their decisions, in one transaction (retried
    whole on a deadlock; rows are updated in id order so nodes rarely meet one)."""
    ordered = sorted(records, key=lambda r: r.delivery_id)
    await retrying(lambda: _record_attempts_once(db, owner, ordered))


def _error_text(r: AttemptRecord) -> str:
    return storable(r.error) or f"HTTP {r.status_code}"
