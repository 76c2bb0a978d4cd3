"""What every node must agree on, in `relay_state`: one row per name (models.py names them).

- `hints`: when the last push hint arrived anywhere, so every node knows whether hints flow;
- `sweep`: when the last sweep started, and the lease of the node sweeping now, so that one
  sweep runs at a time across every process sharing the database;
- `sweep_next`: when the next sweep is planned, so new generations wait for it;
- `sweep_off`: until when sweeps are off, after the upstream answered that it has no list.

Rows are made on first use. Small writes, at most a few a second cluster-wide.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.database import Database
from relay.models import relay_state

HINTS = "hints"
SWEEP = "sweep"
SWEEP_NEXT = "sweep_next"
SWEEP_OFF = "sweep_off"


@dataclass(frozen=True)
class SharedState:
    """The rows as one snapshot (None where a row or a value is missing)."""

    last_hint_at: datetime | None = None
    last_sweep_at: datetime | None = None
    next_sweep_at: datetime | None = None
    sweeps_off_until: datetime | None = None


async def read_state(db: Database) -> SharedState:
    async with db.reader() as conn:
        rows = {row.name: row for row in await conn.execute(select(relay_state))}

    def at(name: str) -> datetime | None:
        return rows[name].at if name in rows else None

    off = rows.get(SWEEP_OFF)
    return SharedState(
        last_hint_at=at(HINTS),
        last_sweep_at=at(SWEEP),
        next_sweep_at=at(SWEEP_NEXT),
        sweeps_off_until=off.until if off is not None else None,
    )


async def _ensure(conn: AsyncConnection, postgres: bool, *names: str) -> None:
    """Make the named rows exist (one statement, however many)."""
    dialect_insert = postgresql.insert if postgres else sqlite.insert
    await conn.execute(
        dialect_insert(relay_state)
        .values([{"name": name} for name in names])
        .on_conflict_do_nothing(index_elements=["name"])
    )


async def note_hint(db: Database, at: datetime) -> None:
    """Record that a push hint arrived at `at` (never moves the time back)."""
    async with db.transaction() as conn:
        await _ensure(conn, db.is_postgres, HINTS)
        await conn.execute(
            update(relay_state)
            .where(
                relay_state.c.name == HINTS,
                or_(relay_state.c.at.is_(None), relay_state.c.at < at),
            )
            .values(at=at)
        )


async def take_sweep(
    db: Database, holder: str, min_gap_s: float, lease_s: float, *, plan_next: bool = True
) -> datetime | None:
    """Become the one node sweeping now, unless another holds the sweep or the last one
    started less than `min_gap_s` ago. Returns the start time (database clock) or None.
    `plan_next`: record the next sweep as planned `min_gap_s` from now (new generations wait
    for it instead of a first poll); not for a look that only measures."""
    now = db.now()
    async with db.transaction() as conn:
        await _ensure(conn, db.is_postgres, SWEEP, SWEEP_NEXT)  # a plan row with no time: none
        taken = await conn.execute(
            update(relay_state)
            .where(
                relay_state.c.name == SWEEP,
                or_(
                    relay_state.c.until.is_(None),
                    relay_state.c.until < now,
                    relay_state.c.holder == holder,
                ),
                or_(
                    relay_state.c.at.is_(None),
                    relay_state.c.at <= now - timedelta(seconds=min_gap_s),
                ),
            )
            .values(at=now, holder=holder, until=now + timedelta(seconds=lease_s))
        )
        if not taken.rowcount:
            return None
        if plan_next:
            await conn.execute(
                update(relay_state)
                .where(relay_state.c.name == SWEEP_NEXT)
                .values(at=now + timedelta(seconds=min_gap_s))
            )
    return now


async def release_sweep(db: Database, holder: str) -> None:
    async with db.transaction() as conn:
        await conn.execute(
            update(relay_state)
            .where(relay_state.c.name == SWEEP, relay_state.c.holder == holder)
            .values(holder=None, until=None)
        )


async def turn_sweeps_off(db: Database, until: datetime) -> None:
    """No sweep before `until` (the upstream said it has no running list)."""
    async with db.transaction() as conn:
        await _ensure(conn, db.is_postgres, SWEEP_OFF)
        await conn.execute(
            update(relay_state).where(relay_state.c.name == SWEEP_OFF).values(until=until)
        )
