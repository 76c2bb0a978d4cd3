"""Idempotency-Keys of creates through the relay: claiming one, the owner's lease on it,
settling it with the answer, reading it back, and pruning it after 24 hours.

Owns every query on `idempotency_keys`. A key is claimed by inserting its row (or by taking
over a row that was released, or is older than the 24-hour window): exactly one request
holds it, whatever the number of processes, since the row's primary key decides. The owner
renews its lease (`locked_until`) while the upstream works; a row still in progress whose
lease ran out lost its owner. What to answer and when to wait are proxy.py's and
idempotency.py's; this module never decides them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import delete, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.database import Database
from relay.models import IdempotencyState, idempotency_keys

WINDOW_S = 86400.0  # how long a key is remembered (the contract's 24 hours)
_t = idempotency_keys.c


@dataclass(frozen=True)
class IdempotencyRef:
    """One Idempotency-Key of one client key, as held by `owner` (a node id)."""

    key_id: str
    idempotency_key: str
    owner: str

    def _row(self) -> Any:
        return (_t.api_key_id == self.key_id) & (_t.idempotency_key == self.idempotency_key)


@dataclass(frozen=True)
class RequestFingerprint:
    """What a retry must repeat: the method and path, and the Relay-* headers' hash."""

    request: str
    target_sha256: str


@dataclass(frozen=True)
class StoredAnswer:
    """An answer as it is replayed: status, the headers passed on, body, subscription."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    subscription_id: str | None = None
    generation_id: str | None = None


@dataclass(frozen=True)
class IdempotencyRecord:
    """A key's row as another request left it."""

    state: IdempotencyState
    fingerprint: RequestFingerprint
    body_sha256: str | None
    answer: StoredAnswer | None
    lapsed: bool  # in progress, but its owner's lease ran out: the owner is gone


@dataclass(frozen=True)
class Settlement:
    """How a claimed key ends: `done` with the answer every retry gets, or `released` (nothing
    was created upstream) with the answer its concurrent duplicates get, if any."""

    ref: IdempotencyRef
    state: IdempotencyState
    body_sha256: str | None
    answer: StoredAnswer | None


async def claim_idempotency_key(
    db: Database, ref: IdempotencyRef, fingerprint: RequestFingerprint, lease_s: float
) -> IdempotencyRecord | None:
    """Claim the key for `ref.owner`: None when it is now held, else the row as it stands."""
    now = db.now()
    values = {
        "request": fingerprint.request,
        "target_sha256": fingerprint.target_sha256,
        "body_sha256": None,
        "state": IdempotencyState.IN_PROGRESS,
        "owner": ref.owner,
        "locked_until": now + timedelta(seconds=lease_s),
        "status_code": None,
        "response_headers": None,
        "response_body": None,
        "subscription_id": None,
        "generation_id": None,
        "created_at": now,
        "updated_at": now,
    }
    async with db.transaction() as conn:
        # Most keys are new: one INSERT claims them.
        insert = (postgresql.insert if db.is_postgres else sqlite.insert)(idempotency_keys)
        inserted = await conn.execute(
            insert.values(api_key_id=ref.key_id, idempotency_key=ref.idempotency_key, **values)
            .on_conflict_do_nothing()
            .returning(_t.state)
        )
        if inserted.first() is not None:
            return None
        # A released key, or one past the window, is as good as new.
        reusable = or_(
            _t.state == IdempotencyState.RELEASED,
            _t.created_at < now - timedelta(seconds=WINDOW_S),
        )
        taken = await conn.execute(
            update(idempotency_keys).where(ref._row(), reusable).values(values).returning(_t.state)
        )
        if taken.first() is not None:
            return None
        return await _read(conn, ref, now)


async def read_idempotency_key(db: Database, ref: IdempotencyRef) -> IdempotencyRecord | None:
    """The key's row, or None if there is none (it was pruned)."""
    async with db.reader() as conn:
        return await _read(conn, ref, db.now())


async def _read(
    conn: AsyncConnection, ref: IdempotencyRef, now: datetime
) -> IdempotencyRecord | None:
    row = (await conn.execute(select(idempotency_keys).where(ref._row()))).mappings().first()
    if row is None:
        return None
    state = IdempotencyState(row["state"])
    answer = None
    if row["status_code"] is not None:
        answer = StoredAnswer(
            status=row["status_code"],
            headers=orjson.loads(row["response_headers"] or "{}"),
            body=bytes(row["response_body"] or b""),
            subscription_id=row["subscription_id"],
            generation_id=row["generation_id"],
        )
    lease = row["locked_until"]
    return IdempotencyRecord(
        state=state,
        fingerprint=RequestFingerprint(row["request"], row["target_sha256"]),
        body_sha256=row["body_sha256"],
        answer=answer,
        lapsed=state == IdempotencyState.IN_PROGRESS and (lease is None or lease <= now),
    )


async def renew_idempotency_key(db: Database, ref: IdempotencyRef, lease_s: float) -> bool:
    """Push the owner's lease to `lease_s` from now; False if it no longer holds the key."""
    async with db.transaction() as conn:
        renewed = await conn.execute(
            update(idempotency_keys)
            .where(ref._row(), *_held_by(ref))
            .values(locked_until=db.now() + timedelta(seconds=lease_s))
            .returning(_t.state)
        )
        return renewed.first() is not None


async def settle_idempotency_key(db: Database, settlement: Settlement) -> bool:
    """End a claimed key (see Settlement); False if its owner no longer held it."""
    async with db.transaction() as conn:
        return await settle_idempotency_key_in(conn, db.now(), settlement)


async def settle_idempotency_key_in(
    conn: AsyncConnection, now: datetime, settlement: Settlement
) -> bool:
    """`settle_idempotency_key` inside the caller's transaction (the commit of a create's subscription)."""
    answer = settlement.answer
    values: dict[str, Any] = {
        "state": settlement.state,
        "body_sha256": settlement.body_sha256,
        "locked_until": None,
        "updated_at": now,
        "status_code": None if answer is None else answer.status,
        "response_headers": None if answer is None else orjson.dumps(dict(answer.headers)).decode(),
        "response_body": None if answer is None else answer.body,
        "subscription_id": None if answer is None else answer.subscription_id,
        "generation_id": None if answer is None else answer.generation_id,
    }
    settled = await conn.execute(
        update(idempotency_keys)
        .where(settlement.ref._row(), *_held_by(settlement.ref))
        .values(values)
        .returning(_t.state)
    )
    return settled.first() is not None


def _held_by(ref: IdempotencyRef) -> tuple[Any, ...]:
    # Owners are node ids, new at every start: a restarted process never holds a key its
    # previous life claimed.
    return (_t.owner == ref.owner, _t.state == IdempotencyState.IN_PROGRESS)


async def prune_idempotency_keys(db: Database, now: datetime, batch: int = 1000) -> int:
    """Delete keys past the 24-hour window, in batches; the number deleted."""
    cutoff = now - timedelta(seconds=WINDOW_S)
    total = 0
    while True:
        old = select(_t.api_key_id, _t.idempotency_key).where(_t.created_at < cutoff).limit(batch)
        async with db.transaction() as conn:
            deleted = await conn.execute(
                delete(idempotency_keys)
                .where(tuple_(_t.api_key_id, _t.idempotency_key).in_(old))
                .returning(_t.api_key_id)
            )
            count = len(deleted.all())
        total += count
        if count < batch:
            return total
