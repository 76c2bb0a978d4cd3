"""Push hints, the store's side: accept each upstream webhook once, and apply what it says.

A hint for a generation being polled updates what hints said of it (`hint_status`,
`hinted_at`) and its schedule: a terminal hint makes it due at once (claimed by any node, as
polls are); an earlier stage updates `status` when it is further along and pushes the next
per-id poll out to the safety net. A poll in flight keeps its lease: its record sees the
hint (generations.record_polls). Hints never touch a final generation. A hint for a
generation nobody watches is remembered in `upstream_hints` for the subscription that may
follow. A repeated `webhook-id` changes nothing.

The schedule's numbers (when the safety-net poll comes) are the caller's; this module only
applies them, in one transaction per batch of hints.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.database import Database
from relay.models import GenerationState, generations, upstream_hints, upstream_webhooks
from relay.statuses import TERMINAL_RANK, furthest, status_rank
from relay.store._sql import any_of, retrying


@dataclass(frozen=True)
class IncomingHint:
    """One verified upstream webhook: its id, and what it says (None: nothing to apply)."""

    webhook_id: str
    generation_id: str | None
    status: str | None
    safety_poll_at: datetime  # when the generation's next per-id poll may be, at the earliest


class HintOutcome(StrEnum):
    DUPLICATE = "duplicate"  # this webhook-id was accepted before
    DUE = "due"  # a terminal hint made a polling generation due now
    APPLIED = "applied"  # a polling generation's hint, status or schedule changed
    REMEMBERED = "remembered"  # nobody watches the generation yet
    IGNORED = "ignored"  # no generation id, or the generation is final already


async def apply_hints(db: Database, hints: Sequence[IncomingHint]) -> list[HintOutcome]:
    """Accept and apply a batch of hints in one transaction; one outcome per hint."""

    async def work() -> list[HintOutcome]:
        async with db.transaction() as conn:
            return await _apply(conn, db.now(), hints, db.is_postgres)

    # Two nodes remembering the same new generation race on its row: retry the loser.
    return await retrying(work, on_integrity_error=True)


async def _apply(
    conn: AsyncConnection, now: datetime, hints: Sequence[IncomingHint], postgres: bool
) -> list[HintOutcome]:
    fresh = await _accept_once(conn, now, [h.webhook_id for h in hints], postgres)
    outcomes: list[HintOutcome] = []
    accepted: list[tuple[int, IncomingHint, str]] = []  # (position, hint, generation id)
    for index, hint in enumerate(hints):
        if hint.webhook_id not in fresh:
            outcomes.append(HintOutcome.DUPLICATE)
            continue
        fresh.discard(hint.webhook_id)  # the same id twice in one batch: the second repeats
        outcomes.append(HintOutcome.IGNORED)
        if hint.generation_id is not None:
            accepted.append((index, hint, hint.generation_id))
    if not accepted:
        return outcomes
    gen_ids = sorted({gen_id for _, _, gen_id in accepted})
    rows = await _lock_generations(conn, gen_ids, postgres)
    remembered: dict[str, str | None] = {}
    changed: dict[str, dict[str, Any]] = {}
    for index, hint, gen_id in accepted:
        row = rows.get(gen_id)
        if row is not None and row["state"] == GenerationState.FINAL:
            continue
        if row is None or row["state"] != GenerationState.POLLING:
            remembered[gen_id] = furthest(remembered.get(gen_id), hint.status)
            outcomes[index] = HintOutcome.REMEMBERED
            continue
        outcomes[index] = _apply_to_row(row, hint, now)
        changed[gen_id] = row
    await _write_generations(conn, list(changed.values()), now)
    await _write_remembered(conn, remembered, now, postgres)
    return outcomes


def _apply_to_row(row: dict[str, Any], hint: IncomingHint, now: datetime) -> HintOutcome:
    """What one hint changes on a polling generation's row (in memory)."""
    row["hinted_at"] = now
    row["hint_status"] = furthest(row["hint_status"], hint.status)
    # A poll in flight holds the row until its record: its lease (due time) is not touched.
    lease_free = row["lease_owner"] is None or row["next_poll_at"] <= now
    if status_rank(hint.status) == TERMINAL_RANK:
        if lease_free:
            row["next_poll_at"] = now
            return HintOutcome.DUE
        return HintOutcome.APPLIED
    if status_rank(hint.status) > status_rank(row["status"]):
        row["status"] = hint.status
        row["status_changed_at"] = now
    if lease_free and status_rank(row["hint_status"]) < TERMINAL_RANK:
        row["next_poll_at"] = max(row["next_poll_at"], hint.safety_poll_at)
    return HintOutcome.APPLIED


async def _accept_once(
    conn: AsyncConnection, now: datetime, webhook_ids: Sequence[str], postgres: bool
) -> set[str]:
    """Record the webhook ids; return those not recorded before."""
    unique = sorted(set(webhook_ids))
    statement = _accept_statement(postgres)
    rows = [{"webhook_id": w, "received_at": now} for w in unique]
    # executemany with RETURNING (SQLAlchemy's insertmanyvalues): one statement compiled once,
    # where .values(rows) compiled anew for every batch size.
    return set((await conn.execute(statement, rows)).scalars())


@functools.cache
def _accept_statement(postgres: bool) -> Any:
    dialect_insert = postgresql.insert if postgres else sqlite.insert
    return (
        dialect_insert(upstream_webhooks)
        .on_conflict_do_nothing(index_elements=["webhook_id"])
        .returning(upstream_webhooks.c.webhook_id)
    )


async def _lock_generations(
    conn: AsyncConnection, gen_ids: Sequence[str], postgres: bool
) -> dict[str, dict[str, Any]]:
    query = (
        select(
            generations.c.id,
            generations.c.state,
            generations.c.status,
            generations.c.status_changed_at,
            generations.c.hint_status,
            generations.c.hinted_at,
            generations.c.lease_owner,
            generations.c.next_poll_at,
        )
        .where(any_of(generations.c.id, gen_ids, postgres))
        .order_by(generations.c.id)
    )
    if postgres:
        query = query.with_for_update()
    return {row["id"]: dict(row) for row in (await conn.execute(query)).mappings()}


async def _write_generations(
    conn: AsyncConnection, rows: Sequence[dict[str, Any]], now: datetime
) -> None:
    if not rows:
        return
    columns = ("hinted_at", "hint_status", "status", "status_changed_at", "next_poll_at")
    await conn.execute(
        update(generations)
        .where(generations.c.id == bindparam("g_id"))
        .values(
            updated_at=now,
            **{name: bindparam(f"v_{name}", type_=generations.c[name].type) for name in columns},
        ),
        [{"g_id": row["id"], **{f"v_{name}": row[name] for name in columns}} for row in rows],
    )


async def _write_remembered(
    conn: AsyncConnection, remembered: dict[str, str | None], now: datetime, postgres: bool
) -> None:
    """Remember hints for generations nobody watches, the furthest status kept."""
    if not remembered:
        return
    known_query = select(upstream_hints.c.generation_id, upstream_hints.c.status).where(
        any_of(upstream_hints.c.generation_id, list(remembered), postgres)
    )
    known = {gen_id: status for gen_id, status in await conn.execute(known_query)}
    rows = [
        {"h_id": gen_id, "h_status": furthest(known.get(gen_id), status), "h_at": now}
        for gen_id, status in remembered.items()
    ]
    new = [r for r in rows if r["h_id"] not in known]
    old = [r for r in rows if r["h_id"] in known]
    if new:
        await conn.execute(
            insert(upstream_hints),
            [
                {"generation_id": r["h_id"], "status": r["h_status"], "received_at": now}
                for r in new
            ],
        )
    if old:
        await conn.execute(
            update(upstream_hints)
            .where(upstream_hints.c.generation_id == bindparam("h_id"))
            .values(status=bindparam("h_status"), received_at=bindparam("h_at")),
            old,
        )


async def remembered_hints(
    conn: AsyncConnection, gen_ids: Sequence[str], since: datetime, postgres: bool
) -> dict[str, tuple[str | None, datetime]]:
    """Hints remembered since `since` for these generations: (status, received_at) by id."""
    query = select(
        upstream_hints.c.generation_id, upstream_hints.c.status, upstream_hints.c.received_at
    ).where(
        any_of(upstream_hints.c.generation_id, gen_ids, postgres),
        upstream_hints.c.received_at >= since,
    )
    return {gen_id: (status, at) for gen_id, status, at in await conn.execute(query)}


async def end_safety_net(db: Database, beyond_s: float) -> int:
    """Push hints went silent: bring forward every safety-net poll due more than `beyond_s`
    from now, so the normal schedule takes over at once. Polls in flight keep their lease.
    Returns how many generations were made due."""
    now = db.now()
    async with db.transaction() as conn:
        result = await conn.execute(
            update(generations)
            .where(
                generations.c.state == GenerationState.POLLING,
                generations.c.hinted_at.is_not(None),
                generations.c.lease_owner.is_(None),
                generations.c.next_poll_at > now + timedelta(seconds=beyond_s),
            )
            .values(next_poll_at=now, updated_at=now)
        )
    return int(result.rowcount)
