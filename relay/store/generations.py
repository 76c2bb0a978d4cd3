"""Polls, the worker's side: claim due generations, renew their leases, record what each
poll saw and, when a generation ends, queue one delivery per active subscription; and stop
polling a generation nobody watches any more.

Owns the writes to `generations` that start, continue or end its polling, except creating
and waking one (creates.py's). The lease rules are _leases.py's; the poll's decisions are the
poller's (plan_record): this module applies them and never decides them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, bindparam, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.database import Database
from relay.models import (
    CallbackEvent,
    GenerationState,
    SubscriptionStatus,
    UTCDateTime,
    deliveries,
    generations,
    subscriptions,
)
from relay.statuses import FINAL_STATUSES
from relay.store._leases import GENERATION_LEASES
from relay.store._sql import any_of, delivery_row, insert_rows, retrying


@dataclass(frozen=True)
class ClaimedGeneration:
    id: str
    status: str | None
    first_subscribed_at: datetime
    status_changed_at: datetime | None
    unchanged_polls: int
    error_count: int
    not_found_since: datetime | None
    hint_status: str | None = None  # the furthest status push hints named
    hinted_at: datetime | None = None  # set: push hints cover this generation
    listing: str | None = None  # models.Listing
    previous_owner: str | None = None  # set: its lease had run out (a takeover)


async def claim_due_generations(
    db: Database, owner: str, limit: int, lease_s: float, turn: int = 0
) -> list[ClaimedGeneration]:
    """Lease up to `limit` generations whose poll is due, shared fairly between the keys
    they are polled for (`fair_key`): with due work for several keys, each gets an equal
    share (keys taken in turn from `turn`, when there are more keys than `limit`), oldest due
    first within a key; what a key leaves of its share goes to the oldest due of anyone."""
    returning = [
        generations.c[f.name] for f in fields(ClaimedGeneration) if f.name in generations.c
    ]
    now = db.now()
    rows: list[Any] = []
    async with db.transaction() as conn:
        keys = await _keys_with_due_work(conn, now)
        if len(keys) > 1:
            start = turn % len(keys)
            keys = (keys[start:] + keys[:start])[:limit]
            share = -(-limit // len(keys))  # ceiling
            for key in keys:
                among = (
                    generations.c.fair_key.is_(None)
                    if key is None
                    else generations.c.fair_key == key
                )
                want = min(share, limit - len(rows))
                if want > 0:
                    rows += await GENERATION_LEASES.claim(
                        conn, owner, want, lease_s, now, returning, among
                    )
        if len(rows) < limit:
            # Claimed rows are no longer due (their due time is the lease's end).
            rows += await GENERATION_LEASES.claim(
                conn, owner, limit - len(rows), lease_s, now, returning
            )
    return [ClaimedGeneration(**row) for row in rows]


# The keys with polling generations, one index probe each (a skip scan of
# ix_generations_fair_due), kept where one of their generations is due: keys with due work
# are few, the due rows may be 100,000.
_DUE_KEYS = text(
    """
    WITH RECURSIVE walk(fair_key) AS (
        SELECT min(fair_key) FROM generations
        WHERE next_poll_at IS NOT NULL AND fair_key IS NOT NULL
        UNION ALL
        SELECT (
            SELECT min(g.fair_key) FROM generations g
            WHERE g.next_poll_at IS NOT NULL AND g.fair_key > walk.fair_key
        )
        FROM walk WHERE walk.fair_key IS NOT NULL
    )
    SELECT fair_key FROM walk
    WHERE fair_key IS NOT NULL AND EXISTS (
        SELECT 1 FROM generations g
        WHERE g.fair_key = walk.fair_key AND g.next_poll_at IS NOT NULL
          AND g.next_poll_at <= :now
    )
    """
).bindparams(bindparam("now", type_=UTCDateTime()))
_DUE_WITHOUT_KEY = (
    select(generations.c.id)
    .where(
        generations.c.fair_key.is_(None),
        generations.c.next_poll_at.is_not(None),
        generations.c.next_poll_at <= bindparam("now"),
    )
    .limit(1)
)


async def _keys_with_due_work(conn: AsyncConnection, now: datetime) -> list[str | None]:
    """The fair keys with a due generation (None: generations without one), in key order."""
    keys: list[str | None] = list((await conn.execute(_DUE_KEYS, {"now": now})).scalars())
    if (await conn.execute(_DUE_WITHOUT_KEY, {"now": now})).first() is not None:
        keys.append(None)
    return keys


async def renew_generation_leases(
    db: Database, owner: str, ids: Sequence[str], lease_s: float
) -> None:
    await GENERATION_LEASES.renew(db, owner, ids, lease_s)


@dataclass(frozen=True)
class PollRecord:
    """What one poll changes on its generation. `event` set: the generation is done
    (final or given up) and `result` is what every active subscriber gets."""

    generation_id: str
    values: Mapping[str, Any]
    event: CallbackEvent | None = None
    notice_payload: str | None = None
    # Not final, yet a terminal push hint may arrive while the poll is in flight: then poll
    # again this soon (the upstream's GET may lag behind its webhook).
    after_terminal_hint_s: float | None = None


async def _record_polls_once(db: Database, owner: str, records: Sequence[PollRecord]) -> list[bool]:
    now = db.now()
    postgres = db.is_postgres
    async with db.transaction() as conn:
        ids = [r.generation_id for r in records]
        held = await GENERATION_LEASES.held(conn, owner, ids, postgres)
        hinted_final = await _hinted_final(conn, [r for r in records if r.generation_id in held])
        # One executemany per shape of change (final, error, still running...).
        by_shape: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for record in records:
            if record.generation_id not in held:
                continue
            values = {**record.values, "updated_at": now}
            soon_s = record.after_terminal_hint_s
            if soon_s is not None and record.generation_id in hinted_final:
                values["next_poll_at"] = min(
                    values["next_poll_at"], now + timedelta(seconds=soon_s)
                )
            shape = tuple(sorted(values))
            by_shape.setdefault(shape, []).append(
                {"g_id": record.generation_id, **{f"v_{k}": v for k, v in values.items()}}
            )
        for shape, rows in by_shape.items():
            await conn.execute(
                update(generations)
                .where(generations.c.id == bindparam("g_id"))
                .values(
                    poll_count=generations.c.poll_count + 1,
                    **{k: bindparam(f"v_{k}", type_=generations.c[k].type) for k in shape},
                ),
                rows,
            )
        ended = {
            r.generation_id: r for r in records if r.event is not None and r.generation_id in held
        }
        if ended:
            subs = await conn.execute(
                select(
                    subscriptions.c.id,
                    subscriptions.c.generation_id,
                    subscriptions.c.callback_url,
                ).where(
                    any_of(subscriptions.c.generation_id, list(ended), postgres),
                    subscriptions.c.status == SubscriptionStatus.ACTIVE,
                )
            )
            new_deliveries = []
            for sub_id, gen_id, callback_url in subs:
                record = ended[gen_id]
                assert record.event is not None
                new_deliveries.append(
                    delivery_row(sub_id, callback_url, record.event, record.notice_payload, now)
                )
            await insert_rows(conn, deliveries, new_deliveries, postgres)
    return [r.generation_id in held for r in records]


async def _hinted_final(conn: AsyncConnection, records: Sequence[PollRecord]) -> set[str]:
    """Which generations a terminal push hint has reached, of those whose record would
    otherwise wait (the rows are locked already)."""
    ids = [r.generation_id for r in records if r.after_terminal_hint_s is not None]
    if not ids:
        return set()
    query = select(generations.c.id).where(
        generations.c.id.in_(ids), generations.c.hint_status.in_(FINAL_STATUSES)
    )
    return set((await conn.execute(query)).scalars())


async def record_polls(db: Database, owner: str, records: Sequence[PollRecord]) -> list[bool]:
    """Apply polls' outcomes and, for each that ends its generation, queue one delivery per
    active subscription, all in one transaction. Each answer is False where the lease was
    lost (nothing written for that generation)."""
    return await retrying(lambda: _record_polls_once(db, owner, records))


async def idle_unwatched(
    conn: AsyncConnection, gen_ids: Sequence[str], now: datetime, postgres: bool
) -> int:
    """Stop polling those of `gen_ids` no active subscription watches any more (after a
    revocation); returns how many stopped."""
    if not gen_ids:
        return 0
    watched = (
        select(subscriptions.c.id)
        .where(
            subscriptions.c.generation_id == generations.c.id,
            subscriptions.c.status == SubscriptionStatus.ACTIVE,
        )
        .exists()
    )
    result = await conn.execute(
        update(generations)
        .where(
            any_of(generations.c.id, gen_ids, postgres),
            generations.c.state == GenerationState.POLLING,
            ~watched,
        )
        .values(state=GenerationState.IDLE, next_poll_at=None, lease_owner=None, updated_at=now)
    )
    await _rekey(conn, any_of(generations.c.id, gen_ids, postgres))
    return int(result.rowcount)


async def _rekey(conn: AsyncConnection, which: ColumnElement[bool]) -> None:
    """Give generations still polled, whose fair key no longer watches them, the key of one
    of their active subscriptions: their polls now take that key's share."""
    active = subscriptions.c.status == SubscriptionStatus.ACTIVE
    of_generation = subscriptions.c.generation_id == generations.c.id
    still_watching = (
        select(subscriptions.c.id)
        .where(of_generation, active, subscriptions.c.api_key_id == generations.c.fair_key)
        .exists()
    )
    await conn.execute(
        update(generations)
        .where(which, generations.c.state == GenerationState.POLLING, ~still_watching)
        .values(
            fair_key=select(func.min(subscriptions.c.api_key_id))
            .where(of_generation, active)
            .scalar_subquery()
        )
    )


async def idle_if_unwatched(conn: AsyncConnection, gen_id: str, now: datetime) -> None:
    """Stop polling the generation if no active subscription is left (after a cancel)."""
    active = (
        await conn.execute(
            select(func.count())
            .select_from(subscriptions)
            .where(
                subscriptions.c.generation_id == gen_id,
                subscriptions.c.status == SubscriptionStatus.ACTIVE,
            )
        )
    ).scalar_one()
    if active == 0:
        await conn.execute(
            update(generations)
            .where(generations.c.id == gen_id, generations.c.state == GenerationState.POLLING)
            .values(state=GenerationState.IDLE, next_poll_at=None, lease_owner=None, updated_at=now)
        )
    else:
        await _rekey(conn, generations.c.id == gen_id)
