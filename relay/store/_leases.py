"""Leases on due work, written once for the two tables that hold it: a generation's next poll
and a delivery's next attempt.

A leased table has a due-time column, a `lease_owner` column and a condition under which a row
is still work ("live": a generation still polling, a delivery still pending). A claim pushes
due rows' due time to the end of the lease and names the owner, so a crashed process's work
falls due again by itself. A lease is held while its owner is named on a live row; every
completion checks that before writing, so a process whose lease ran out cannot overwrite the
work of the one that took over.

Private to relay.store; the queries around a claim (what is returned, what is written after)
belong to generations.py, deliveries.py and attempts.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Column, ColumnElement, Table, and_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.database import Database
from relay.models import DeliveryStatus, GenerationState, deliveries, generations
from relay.store._sql import any_of


@dataclass(frozen=True, eq=False)
class Leased:
    """A table whose due rows are claimed under leases."""

    table: Table
    due_column: str
    live: ColumnElement[bool]
    # Set where only live rows have a due time: the claim then reads the due index alone.
    due_means_live: bool = False

    @property
    def _id(self) -> Column[Any]:
        return self.table.c.id

    @property
    def _due(self) -> Column[Any]:
        return self.table.c[self.due_column]

    def held_by(self, owner: str) -> ColumnElement[bool]:
        """The rows whose lease `owner` still holds."""
        return and_(self.table.c.lease_owner == owner, self.live)

    async def claim(
        self,
        conn: AsyncConnection,
        owner: str,
        limit: int,
        lease_s: float,
        now: datetime,
        returning: Sequence[ColumnElement[Any]],
        among: ColumnElement[bool] | None = None,
    ) -> list[dict[str, Any]]:
        """Lease up to `limit` due rows (only those `among` picks, if given), earliest due
        first; `returning` of each, and its `previous_owner`: the node whose lease had run out
        on it (a takeover), or None. SKIP LOCKED: rows another node is claiming or writing
        are left to it, never waited for."""
        due = select(self._id, self.table.c.lease_owner).where(self._due <= now)
        if among is not None:
            due = due.where(among)
        if not self.due_means_live:
            due = due.where(self.live)
        due = due.order_by(self._due).limit(limit).with_for_update(skip_locked=True)
        # Two statements, the rows locked by the first (PostgreSQL) or the transaction being
        # the only writer (SQLite): an UPDATE's RETURNING cannot show the owner it replaced.
        previous = {row_id: row_owner for row_id, row_owner in await conn.execute(due)}
        if not previous:
            return []
        claim = (
            update(self.table)
            .where(any_of(self._id, list(previous), conn.dialect.name == "postgresql"))
            .values({self.due_column: now + timedelta(seconds=lease_s), "lease_owner": owner})
            .returning(*returning)
        )
        rows = (await conn.execute(claim)).mappings().all()
        return [{**row, "previous_owner": previous[row[self._id.name]]} for row in rows]

    async def renew(self, db: Database, owner: str, ids: Sequence[Any], lease_s: float) -> None:
        """Push the leases `owner` still holds among `ids` to `lease_s` from now."""
        if not ids:
            return
        until = db.now() + timedelta(seconds=lease_s)
        # SKIP LOCKED: a row busy in another transaction is renewed next round instead of
        # making this multi-row update wait (and deadlock) on it.
        held = (
            select(self._id)
            .where(any_of(self._id, ids, db.is_postgres), self.held_by(owner))
            .with_for_update(skip_locked=True)
        )
        async with db.transaction() as conn:
            await conn.execute(
                update(self.table)
                .where(self._id.in_(held.scalar_subquery()))
                .values({self.due_column: until})
            )

    async def held(
        self, conn: AsyncConnection, owner: str, ids: Sequence[Any], postgres: bool
    ) -> set[Any]:
        """Which of `ids` `owner` still holds, locked (PostgreSQL) in id order so that no node
        can take one before this transaction has written it."""
        query = (
            select(self._id)
            .where(any_of(self._id, ids, postgres), self.held_by(owner))
            .order_by(self._id)
        )
        if postgres:
            query = query.with_for_update()
        return set((await conn.execute(query)).scalars())


GENERATION_LEASES = Leased(
    generations,
    "next_poll_at",
    generations.c.state == GenerationState.POLLING,
    # Only a polling generation has a next_poll_at (idle, final and expired clear it).
    due_means_live=True,
)

DELIVERY_LEASES = Leased(
    deliveries,
    "next_attempt_at",
    deliveries.c.status == DeliveryStatus.PENDING,
)
