"""Batch sweeps, the store's side: what a sweep could cover, and what one sweep's running list
changes.

A generation the list shows as running needs no per-id poll: its status is updated and its
next per-id poll pushed out to `cover_until` (if sweeps stop, per-id polling resumes by
itself then). A watched generation missing from a complete list is not running in this
workspace: it is made due at once (`missing`), and the poll that fetches it finds it final,
or still running elsewhere (`unlisted`, poller.plan_record), after which absence alone never
fetches it again. A list cut short proves only what it shows; but a generation an earlier
list showed and this one does not has most likely ended, so it is fetched too (`dropped`):
one GET, the one that brings its final body, or else it goes back to per-id polls. A poll
in flight keeps its lease: its row is left alone.

The sweeper decides when to sweep and with what; this module only counts and applies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, case, false, func, not_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.database import Database
from relay.models import GenerationState, Listing, generations
from relay.statuses import TERMINAL_RANK, furthest, status_rank
from relay.store._sql import any_of, retrying


@dataclass(frozen=True)
class SweepCounts:
    """Polling generations a sweep could cover (never `unlisted` ones): those that rely on
    polls to detect their final status, and those push hints cover whose safety-net poll is
    due."""

    covered: int
    hinted_due: int
    total: int  # every sweepable generation, hinted or not


@dataclass(frozen=True)
class SweepResult:
    listed: int  # watched polling generations the list showed
    missing: int  # watched generations absent from the list and now due (missing, dropped)


def _sweepable() -> Any:
    return and_(
        generations.c.state == GenerationState.POLLING,
        or_(generations.c.listing.is_(None), generations.c.listing != Listing.UNLISTED),
    )


async def sweep_counts(db: Database, hints_flowing: bool, due_before: datetime) -> SweepCounts:
    """Count what a sweep could cover now. While push hints flow, a generation they have
    reached (hinted_at set) counts only when its safety-net poll is due before `due_before`."""
    hinted = generations.c.hinted_at.is_not(None) if hints_flowing else false()
    one = case((hinted, 0), else_=1)
    due = case((and_(hinted, generations.c.next_poll_at <= due_before), 1), else_=0)
    query = select(
        func.coalesce(func.sum(one), 0), func.coalesce(func.sum(due), 0), func.count()
    ).where(_sweepable())
    async with db.reader() as conn:
        covered, hinted_due, total = (await conn.execute(query)).one()
    return SweepCounts(int(covered), int(hinted_due), int(total))


async def apply_sweep(
    db: Database,
    listed: Sequence[Any],
    complete: bool,
    sent_at: datetime,
    cover_until: datetime,
    unchanged_polls_for: Callable[[float], int],
) -> SweepResult:
    """Apply one running list (items with `generation_id` and `status`), in one transaction.
    `sent_at`: when the list was asked for; only generations subscribed before it can be
    missing from it. `unchanged_polls_for(age_s)`: where a listed generation's per-id
    schedule stands, by the time its status has not changed, for when per-id polls resume."""

    async def work() -> SweepResult:
        now = db.now()
        async with db.transaction() as conn:
            shown = await _apply_listed(
                conn, now, listed, cover_until, unchanged_polls_for, db.is_postgres
            )
            ids = [item.generation_id for item in listed]
            missing = await _mark_missing(conn, now, ids, sent_at, complete, db.is_postgres)
        return SweepResult(listed=shown, missing=missing)

    return await retrying(work)


async def _apply_listed(
    conn: AsyncConnection,
    now: datetime,
    listed: Sequence[Any],
    cover_until: datetime,
    unchanged_polls_for: Callable[[float], int],
    postgres: bool,
) -> int:
    statuses = {item.generation_id: item.status for item in listed}
    if not statuses:
        return 0
    # On SQLite by id alone, the state checked below: with `state = polling` in the query it
    # chose the state index and read every polling generation, on every sweep.
    # PostgreSQL keeps the condition, so that it locks no idle or final row.
    query = (
        select(
            generations.c.id,
            generations.c.state,
            generations.c.status,
            generations.c.status_changed_at,
            generations.c.first_subscribed_at,
            generations.c.unchanged_polls,
            generations.c.hint_status,
            generations.c.lease_owner,
            generations.c.next_poll_at,
        )
        .where(any_of(generations.c.id, sorted(statuses), postgres))
        .order_by(generations.c.id)
    )
    if postgres:
        query = query.where(generations.c.state == GenerationState.POLLING).with_for_update()
    rows = [
        dict(row)
        for row in (await conn.execute(query)).mappings()
        if row["state"] == GenerationState.POLLING
    ]
    if not rows:
        return 0
    for row in rows:
        status = furthest(row["status"], statuses[row["id"]])
        if status != row["status"]:
            row["status"], row["status_changed_at"], row["unchanged_polls"] = status, now, 0
        else:
            since = row["status_changed_at"] or row["first_subscribed_at"]
            age_polls = unchanged_polls_for((now - since).total_seconds())
            row["unchanged_polls"] = max(row["unchanged_polls"], age_polls)
        lease_free = row["lease_owner"] is None or row["next_poll_at"] <= now
        # A terminal hint says the list may be late: its fetch stays due.
        if lease_free and status_rank(row["hint_status"]) < TERMINAL_RANK:
            row["next_poll_at"] = max(row["next_poll_at"], cover_until)
    await conn.execute(
        update(generations)
        .where(generations.c.id == bindparam("g_id"))
        .values(
            listing=Listing.LISTED,
            listed_at=now,
            status=bindparam("g_status"),
            status_changed_at=bindparam("g_changed", type_=generations.c.status_changed_at.type),
            unchanged_polls=bindparam("g_unchanged"),
            next_poll_at=bindparam("g_next", type_=generations.c.next_poll_at.type),
        ),
        [
            {
                "g_id": row["id"],
                "g_status": row["status"],
                "g_changed": row["status_changed_at"],
                "g_unchanged": row["unchanged_polls"],
                "g_next": row["next_poll_at"],
            }
            for row in rows
        ],
    )
    return len(rows)


async def _mark_missing(
    conn: AsyncConnection,
    now: datetime,
    listed_ids: Sequence[str],
    sent_at: datetime,
    complete: bool,
    postgres: bool,
) -> int:
    """Make due the watched generations this list should have shown and did not: with a
    complete list every one subscribed before it was asked for; with one cut short, those an
    earlier list showed."""
    conditions = [
        _sweepable(),
        or_(generations.c.lease_owner.is_(None), generations.c.next_poll_at <= now),
    ]
    if complete:
        conditions.append(generations.c.first_subscribed_at < sent_at)
        mark = Listing.MISSING
    else:
        conditions += [generations.c.listing == Listing.LISTED, generations.c.listed_at < sent_at]
        mark = Listing.DROPPED
    if listed_ids:
        conditions.append(not_(any_of(generations.c.id, listed_ids, postgres)))
    result = await conn.execute(
        update(generations).where(*conditions).values(listing=mark, next_poll_at=now)
    )
    return int(result.rowcount)
