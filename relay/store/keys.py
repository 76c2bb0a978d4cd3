"""API keys: create, list, revoke (which stops the key's work), and authenticate by hash.

Owns the `api_keys` table, and what a revocation writes to the key's subscriptions,
deliveries and generations. No table holds a usable key: only its SHA-256 hash and a prefix
for operators. The signing secret is stored in the clear (HMAC needs it) and is returned once,
at creation; nothing here ever logs a key or a secret.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import RowMapping

from relay.database import Database
from relay.ids import new_id
from relay.models import (
    DeliveryStatus,
    SubscriptionStatus,
    api_keys,
    deliveries,
    generations,
    subscriptions,
)
from relay.signing import generate_secret
from relay.store._sql import any_of, cancel_deliveries, retrying
from relay.store.generations import idle_unwatched


def hash_api_key(api_key: str) -> str:
    """SHA-256 of a key: keys are 256-bit random, so a plain hash is enough to make a copy of
    the database useless for calling the API."""
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class NewKey:
    id: str
    name: str
    api_key: str = field(repr=False)
    signing_secret: str = field(repr=False)


async def create_key(db: Database, name: str) -> NewKey:
    """A new key; its signing secret is stored sealed (db.secrets), returned in the clear."""
    api_key = "rk_" + secrets.token_urlsafe(32)
    key = NewKey(id=new_id("key"), name=name, api_key=api_key, signing_secret=generate_secret())
    sealed = db.secrets.seal(key.signing_secret, key.id)
    async with db.transaction() as conn:
        await conn.execute(
            insert(api_keys).values(
                id=key.id,
                name=name,
                key_hash=hash_api_key(api_key),
                key_prefix=api_key[:10],
                signing_secret=sealed,
                created_at=db.now(),
            )
        )
    return key


@dataclass(frozen=True)
class RotatedSecret:
    id: str
    signing_secret: str = field(repr=False)
    overlap_until: datetime | None  # until when the replaced secret still signs; None: not


async def rotate_secret(db: Database, key_id: str, overlap_s: float) -> RotatedSecret | None:
    """Give a key a new signing secret; None if there is no such live key.

    For `overlap_s` seconds callbacks carry signatures with both the new and the replaced
    secret (new first); after that only the new one. A secret replaced earlier whose overlap
    is still running stops signing now: there are never more than two.
    """
    secret = generate_secret()
    async with db.transaction() as conn:
        current = (
            await conn.execute(
                select(api_keys.c.signing_secret).where(
                    api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None)
                )
            )
        ).scalar_one_or_none()
        if current is None:
            return None
        db.secrets.open(current, key_id)  # the key must open it, or the overlap signs nothing
        now = db.now()
        until = now + timedelta(seconds=overlap_s) if overlap_s > 0 else None
        await conn.execute(
            update(api_keys)
            .where(api_keys.c.id == key_id)
            .values(
                signing_secret=db.secrets.seal(secret, key_id),
                previous_signing_secret=current if until is not None else None,
                previous_secret_until=until,
            )
        )
    return RotatedSecret(key_id, secret, until)


_REPLACE_SECRET = (
    update(api_keys)
    .where(api_keys.c.id == bindparam("k_id"))
    .values(
        signing_secret=bindparam("k_secret"),
        previous_signing_secret=None,
        previous_secret_until=None,
    )
)


def _replacement(db: Database, key: NewKey) -> dict[str, str]:
    return {"k_id": key.id, "k_secret": db.secrets.seal(key.signing_secret, key.id)}


async def reset_secrets(db: Database) -> list[NewKey]:
    """Give every live key a new signing secret at once, with no overlap: for when the old
    secrets cannot be opened any more (RELAY_SECRET_KEY lost). `api_key` is left empty."""
    async with db.transaction() as conn:
        rows = (
            await conn.execute(
                select(api_keys.c.id, api_keys.c.name)
                .where(api_keys.c.revoked_at.is_(None))
                .order_by(api_keys.c.id)
            )
        ).all()
        fresh = [NewKey(row.id, row.name, "", generate_secret()) for row in rows]
        for key in fresh:
            await conn.execute(_REPLACE_SECRET, _replacement(db, key))
    return fresh


async def check_secret_key(db: Database) -> None:
    """SecretKeyError unless db.secrets opens the newest key's signing secret (a database
    without keys has nothing to lose)."""
    async with db.reader() as conn:
        row = (
            await conn.execute(
                select(api_keys.c.id, api_keys.c.signing_secret)
                .order_by(api_keys.c.created_at.desc(), api_keys.c.id.desc())
                .limit(1)
            )
        ).first()
    if row is not None:
        db.secrets.open(row.signing_secret, row.id)


async def list_keys(db: Database) -> list[RowMapping]:
    query = select(
        api_keys.c.id,
        api_keys.c.name,
        api_keys.c.key_prefix,
        api_keys.c.created_at,
        api_keys.c.revoked_at,
    ).order_by(api_keys.c.id)
    async with db.reader() as conn:
        return list((await conn.execute(query)).mappings())


@dataclass(frozen=True)
class Revoked:
    """What a revocation stopped."""

    subscriptions_canceled: int
    generations_stopped: int


REVOKED_ERROR = "key revoked"


async def revoke_key(db: Database, key_id: str) -> Revoked | None:
    """Revoke a key and stop its work, in one transaction; None if there is no such key.

    Its active subscriptions become `canceled` with last_error "key revoked", its pending
    deliveries are canceled (an attempt already in flight may finish; its outcome changes
    nothing), and generations no other key's active subscription watches stop being polled.
    Revoking twice is not an error.
    """
    return await retrying(lambda: _revoke_once(db, key_id))


async def _revoke_once(db: Database, key_id: str) -> Revoked | None:
    now = db.now()
    postgres = db.is_postgres
    async with db.transaction() as conn:
        # The key row first (the lock order): a create batch holds it shared while it checks
        # the key and inserts, so none can slip an active subscription past this revocation.
        found = select(api_keys.c.id).where(api_keys.c.id == key_id)
        if postgres:
            found = found.with_for_update()
        if (await conn.execute(found)).first() is None:
            return None
        await conn.execute(
            update(api_keys)
            .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        mine = subscriptions.c.api_key_id == key_id
        active = mine & (subscriptions.c.status == SubscriptionStatus.ACTIVE)
        gen_ids = list(
            (
                await conn.execute(
                    select(subscriptions.c.generation_id)
                    .where(active)
                    .distinct()
                    .order_by(subscriptions.c.generation_id)
                )
            ).scalars()
        )
        if postgres and gen_ids:
            # Then generations, deliveries, subscriptions: the order every writer keeps.
            await conn.execute(
                select(generations.c.id)
                .where(any_of(generations.c.id, gen_ids, postgres))
                .order_by(generations.c.id)
                .with_for_update()
            )
        pending = (
            deliveries.c.status == DeliveryStatus.PENDING
        ) & deliveries.c.subscription_id.in_(select(subscriptions.c.id).where(mine))
        if postgres:
            await conn.execute(
                select(deliveries.c.id).where(pending).order_by(deliveries.c.id).with_for_update()
            )
        await cancel_deliveries(conn, pending, now, REVOKED_ERROR)
        canceled = await conn.execute(
            update(subscriptions)
            .where(active)
            .values(status=SubscriptionStatus.CANCELED, last_error=REVOKED_ERROR, updated_at=now)
        )
        stopped = await idle_unwatched(conn, gen_ids, now, postgres)
    return Revoked(int(canceled.rowcount), stopped)


async def authenticate(db: Database, key_hash: str) -> str | None:
    """The id of the live key with this hash, or None."""
    query = select(api_keys.c.id).where(
        api_keys.c.key_hash == key_hash, api_keys.c.revoked_at.is_(None)
    )
    async with db.reader() as conn:
        return (await conn.execute(query)).scalar_one_or_none()
