"""Generations followed through the upstream's event stream instead of polled: the stream
lease that keeps their per-id poll away, its renewal, and its end.

While a process follows a generation's stream, the generation's `next_poll_at` is pushed to
the end of a lease and `lease_owner` names the stream's follower (not a poller), so no node
polls it; the follower renews the lease (the shared pattern of _leases.py). When the stream
ends (a final event, or the stream was lost) the generation is due at once: a final GET
fetches the result, or polling resumes on the normal schedule. When the follower dies, the
lease runs out and polling resumes by itself. This module sets the lease on a generation
being subscribed (proxied.py calls it inside its commit) and never decides what a stream
means (streams.py does).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import or_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.database import Database
from relay.models import GenerationState, generations
from relay.store._leases import GENERATION_LEASES
from relay.store._sql import any_of

_g = generations.c


async def lease_to_stream(
    conn: AsyncConnection, now: datetime, gen_id: str, owner: str, lease_s: float
) -> None:
    """Hand a polling generation's schedule to the stream `owner` follows (in the caller's
    transaction, the one that subscribes to it)."""
    await conn.execute(
        update(generations)
        .where(_g.id == gen_id, _g.state == GenerationState.POLLING)
        .values(next_poll_at=now + timedelta(seconds=lease_s), lease_owner=owner, updated_at=now)
    )


async def renew_stream_leases(db: Database, owner: str, ids: Sequence[str], lease_s: float) -> None:
    """Keep the streams `owner` still follows among `ids` leased for `lease_s` more."""
    for start in range(0, len(ids), 1000):
        await GENERATION_LEASES.renew(db, owner, ids[start : start + 1000], lease_s)


async def end_streams(db: Database, owner: str, ids: Sequence[str]) -> None:
    """The streams of `ids` ended: their generations are due now. A generation a poller
    holds at this moment is left to it (its poll is under way)."""
    for start in range(0, len(ids), 1000):
        now = db.now()
        async with db.transaction() as conn:
            await conn.execute(
                update(generations)
                .where(
                    any_of(_g.id, list(ids[start : start + 1000]), db.is_postgres),
                    _g.state == GenerationState.POLLING,
                    or_(_g.lease_owner == owner, _g.lease_owner.is_(None)),
                )
                .values(next_poll_at=now, lease_owner=None, updated_at=now)
            )
