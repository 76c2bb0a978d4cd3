"""When a generation starts being polled (new, or woken for a new subscriber): its first per-id
poll, and what a push hint remembered for it already said.

The timing is the detection mode's call (signals.FirstPoll); this module applies it in the
create's transaction. Private to relay.store: creates.py calls it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, update
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.models import generations
from relay.statuses import TERMINAL_RANK, status_rank
from relay.store.hints import remembered_hints


@dataclass(frozen=True)
class FirstPoll:
    """When a generation nobody was waiting for gets its first per-id poll: the detection
    mode's call (signals.py). A push hint remembered for it wins: a terminal one makes it
    due at once, an earlier stage sets its status and the safety-net delay."""

    delay_s: float = 0.0  # no hint remembered
    hint_memory_s: float | None = None  # None: push hints are off, nothing to look up
    hinted_delay_s: float = 0.0


async def first_polls(
    conn: AsyncConnection,
    now: datetime,
    gen_ids: Sequence[str],
    first_poll: FirstPoll,
    postgres: bool,
) -> dict[str, dict[str, Any]]:
    """Each starting generation's first poll, and what a remembered push hint said of it, as
    the column values to write."""
    starts: dict[str, dict[str, Any]] = {
        gid: {"next_poll_at": now + timedelta(seconds=first_poll.delay_s)} for gid in gen_ids
    }
    if first_poll.hint_memory_s is None or not gen_ids:
        return starts
    since = now - timedelta(seconds=first_poll.hint_memory_s)
    for gid, (status, received_at) in (
        await remembered_hints(conn, gen_ids, since, postgres)
    ).items():
        start = starts[gid]
        start.update(hint_status=status, hinted_at=received_at)
        if status_rank(status) == TERMINAL_RANK:
            start["next_poll_at"] = now  # one GET fetches the final body
        elif status_rank(status) > 0:
            start.update(
                status=status,
                status_changed_at=received_at,
                next_poll_at=now + timedelta(seconds=first_poll.hinted_delay_s),
            )
    return starts


async def set_first_polls(conn: AsyncConnection, starts: Mapping[str, Mapping[str, Any]]) -> None:
    """Write woken generations' starts, one statement per shape of start."""
    by_shape: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for gid, start in starts.items():
        by_shape.setdefault(tuple(sorted(start)), []).append(
            {"g_id": gid, **{f"v_{k}": v for k, v in start.items()}}
        )
    for shape, rows in by_shape.items():
        await conn.execute(
            update(generations)
            .where(generations.c.id == bindparam("g_id"))
            .values({k: bindparam(f"v_{k}", type_=generations.c[k].type) for k in shape}),
            rows,
        )
