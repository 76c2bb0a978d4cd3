"""Locks on API keys, between create batches and a revocation, on PostgreSQL.

Transaction-level advisory locks keyed by the key's hash, not row locks on `api_keys`: a
`FOR SHARE` row lock writes the tuple (and, held by several batches at once, a MultiXact),
which cost PostgreSQL ingest 20-30% with four batches in flight. Advisory locks live in
shared memory only. A create batch takes its keys' locks shared (creates never wait on each
other) or exclusive where it counts the key's quota (counted batches take turns); a
revocation takes its key's exclusively, so it waits for the batches already holding it and
every later batch sees the key revoked. SQLite has one writer at a time and needs none.

Private to relay.store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

# The two-int form of advisory locks, in its own key space: the first int names what is
# locked (API keys), apart from the single-bigint locks housekeeping takes.
KEY_LOCK_CLASS = 0x6B6579  # "key"


def key_lock_id(key_hash: str) -> int:
    """A signed 32-bit number for the key (two keys sharing one only take turns more)."""
    return int.from_bytes(hashlib.sha256(key_hash.encode()).digest()[:4], "big", signed=True)


async def lock_keys(
    conn: AsyncConnection, shared: Iterable[str], exclusive: Iterable[str] = ()
) -> None:
    """Take the keys' locks for the rest of the transaction, in one order for every
    transaction (so two batches never deadlock); a key in both sets is taken exclusively.
    Must run in its own statement before the key rows are read: a READ COMMITTED statement
    sees what was committed when it began, not when its lock was granted."""
    wanted = {key_lock_id(h): False for h in shared}
    wanted.update({key_lock_id(h): True for h in exclusive})
    if not wanted:
        return
    ids = sorted(wanted)
    modes = [wanted[i] for i in ids]
    await conn.execute(
        text(
            "SELECT CASE WHEN t.exclusive THEN pg_advisory_xact_lock(:cls, t.id)::text"
            " ELSE pg_advisory_xact_lock_shared(:cls, t.id)::text END"
            " FROM unnest(CAST(:ids AS int[]), CAST(:modes AS boolean[]))"
            " WITH ORDINALITY AS t(id, exclusive, n) ORDER BY t.n"
        ),
        {"cls": KEY_LOCK_CLASS, "ids": ids, "modes": modes},
    )
