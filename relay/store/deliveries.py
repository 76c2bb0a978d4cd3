"""The outbox, the worker's side: claim due deliveries with everything needed to send them,
renew and release their leases, and push a saturated host's backlog back.

Owns the deliverer's writes to `deliveries` before an attempt; what an attempt's outcome
writes is attempts.py's, the lease rules are _leases.py's. Never decides when to send: the
deliverer does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.addresses import receiver_host
from relay.database import Database
from relay.models import (
    CallbackEvent,
    DeliveryStatus,
    api_keys,
    deliveries,
    generations,
    subscriptions,
)
from relay.store._leases import DELIVERY_LEASES
from relay.store._sql import any_of, retrying

logger = logging.getLogger(__name__)

HOST_DEFER_BATCH = 1000  # bounds one deferral's UPDATE, however large the host's backlog


@dataclass(frozen=True)
class ClaimedDelivery:
    id: int
    subscription_id: str
    webhook_id: str
    event: CallbackEvent
    attempts: int  # attempts of this delivery so far
    subscription_attempts: int  # attempts of the subscription so far (numbering)
    callback_url: str
    host: str  # addresses.receiver_host(callback_url)
    # Opened from their sealed form: the current secret first, then the one it replaced
    # while its rotation overlap runs.
    signing_secrets: tuple[str, ...] = field(repr=False)
    body: bytes = field(repr=False)
    queued_at: datetime  # when the delivery was queued (the final status recorded, or later)
    previous_owner: str | None = None  # set: its lease had run out (a takeover)


async def claim_due_deliveries(
    db: Database, owner: str, limit: int, lease_s: float
) -> list[ClaimedDelivery]:
    """Lease up to `limit` due deliveries with everything needed to send them."""
    async with db.transaction() as conn:
        claimed = await DELIVERY_LEASES.claim(
            conn, owner, limit, lease_s, db.now(), [deliveries.c.id]
        )
        if not claimed:
            return []
        previous = {row["id"]: row["previous_owner"] for row in claimed}
        ids = list(previous)
        rows = (
            (
                await conn.execute(
                    select(
                        deliveries.c.id,
                        deliveries.c.subscription_id,
                        deliveries.c.webhook_id,
                        deliveries.c.event,
                        deliveries.c.attempts,
                        deliveries.c.payload,
                        deliveries.c.host,
                        deliveries.c.created_at,
                        subscriptions.c.attempts.label("subscription_attempts"),
                        subscriptions.c.callback_url,
                        subscriptions.c.api_key_id,
                        api_keys.c.signing_secret,
                        api_keys.c.previous_signing_secret,
                        api_keys.c.previous_secret_until,
                        generations.c.result,
                    )
                    .join(subscriptions, subscriptions.c.id == deliveries.c.subscription_id)
                    .join(api_keys, api_keys.c.id == subscriptions.c.api_key_id)
                    .join(generations, generations.c.id == subscriptions.c.generation_id)
                    .where(any_of(deliveries.c.id, ids, db.is_postgres))
                )
            )
            .mappings()
            .all()
        )
    now = db.now()
    claimed_deliveries = []
    bodies: dict[str, bytes] = {}  # one copy of a result, however many subscribers share it
    for row in rows:
        text_body = row["payload"] if row["payload"] is not None else row["result"]
        if text_body is None:
            logger.error(
                "delivery %s has no body to send; it is sent as {}",
                row["id"],
                extra={"event": "delivery.no_body", "subscription_id": row["subscription_id"]},
            )
            text_body = "{}"
        body = bodies.setdefault(text_body, text_body.encode())
        claimed_deliveries.append(
            ClaimedDelivery(
                id=row["id"],
                subscription_id=row["subscription_id"],
                webhook_id=row["webhook_id"],
                event=CallbackEvent(row["event"]),
                attempts=row["attempts"],
                subscription_attempts=row["subscription_attempts"],
                callback_url=row["callback_url"],
                host=row["host"] or receiver_host(row["callback_url"]),
                signing_secrets=_signing_secrets(db, row, now),
                body=body,
                queued_at=row["created_at"],
                previous_owner=previous[row["id"]],
            )
        )
    return claimed_deliveries


def _signing_secrets(db: Database, row: Mapping[Any, Any], now: datetime) -> tuple[str, ...]:
    key_id = row["api_key_id"]
    current = db.secrets.open(row["signing_secret"], key_id)
    previous, until = row["previous_signing_secret"], row["previous_secret_until"]
    if previous is None or until is None or until <= now:
        return (current,)
    return (current, db.secrets.open(previous, key_id))


async def renew_delivery_leases(
    db: Database, owner: str, ids: Sequence[int], lease_s: float
) -> None:
    await DELIVERY_LEASES.renew(db, owner, ids, lease_s)


async def release_deliveries(db: Database, owner: str, ids: Sequence[int]) -> None:
    """Give deliveries this owner leased back unattempted, due now (the deliverer is closing
    and had them waiting for their host)."""
    if not ids:
        return
    now = db.now()
    async with db.transaction() as conn:
        await conn.execute(
            update(deliveries)
            .where(any_of(deliveries.c.id, ids, db.is_postgres), DELIVERY_LEASES.held_by(owner))
            .values(next_attempt_at=now, lease_owner=None)
        )


@dataclass(frozen=True)
class HostDeferral:
    """A host at its limit: the deliveries claimed for it beyond the limit, and for how long
    to give them, and the host's other due deliveries, back."""

    claimed_ids: Sequence[int]
    delay_s: float


async def defer_hosts(db: Database, owner: str, hosts: Mapping[str, HostDeferral]) -> int:
    """Push back, by each host's delay, the deliveries this owner claimed for it and up to
    HOST_DEFER_BATCH of its other due deliveries that nobody holds (earliest first). A lease,
    even one that ran out while its holder is still sending, is never taken: only the claimed
    ids (this owner's) and unleased rows change. A receiver that hangs with a large backlog
    thus costs two statements per deferral instead of a claim and a deferral per delivery.
    Returns how many deliveries were deferred."""
    if not hosts:
        return 0

    async def work() -> int:
        now = db.now()
        deferred = 0
        async with db.transaction() as conn:
            for host, deferral in sorted(hosts.items()):
                deferred += await _defer_host(conn, db.is_postgres, owner, host, deferral, now)
        return deferred

    return await retrying(work)


async def _defer_host(
    conn: AsyncConnection,
    postgres: bool,
    owner: str,
    host: str,
    deferral: HostDeferral,
    now: datetime,
) -> int:
    pending = deliveries.c.status == DeliveryStatus.PENDING
    backlog = (
        select(deliveries.c.id)
        .where(
            deliveries.c.host == host,
            pending,
            deliveries.c.next_attempt_at <= now,
            deliveries.c.lease_owner.is_(None),
        )
        .order_by(deliveries.c.next_attempt_at)
        .limit(HOST_DEFER_BATCH)
        .with_for_update(skip_locked=True)
    )
    unleased = list((await conn.execute(backlog)).scalars())
    # By id, not by host: a claimed delivery written without a host (an older node's) is
    # given back too.
    mine = and_(
        any_of(deliveries.c.id, deferral.claimed_ids, postgres),
        deliveries.c.lease_owner == owner,
    )
    free = and_(any_of(deliveries.c.id, unleased, postgres), deliveries.c.lease_owner.is_(None))
    result = await conn.execute(
        update(deliveries)
        .where(pending, or_(mine, free))
        .values(next_attempt_at=now + timedelta(seconds=deferral.delay_s), lease_owner=None)
    )
    return int(result.rowcount)
