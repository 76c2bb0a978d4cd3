"""API keys: create, list, revoke, and authenticate by hash.

Owns the `api_keys` table. No table holds a usable key: only its SHA-256 hash and a prefix
for operators. The signing secret is stored in the clear (HMAC needs it) and is returned once,
at creation; nothing here ever logs a key or a secret.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import insert, select, update
from sqlalchemy.engine import RowMapping

from relay.database import Database
from relay.ids import new_id
from relay.models import api_keys
from relay.signing import generate_secret


def hash_api_key(api_key: str) -> str:
    """SHA-256 of a key: keys are 256-bit random, so a plain hash is enough to make a copy of
    the database useless for calling the API."""
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class NewKey:
    id: str
    name: str
    api_key: str
    signing_secret: str


async def create_key(db: Database, name: str) -> NewKey:
    api_key = "rk_" + secrets.token_urlsafe(32)
    key = NewKey(id=new_id("key"), name=name, api_key=api_key, signing_secret=generate_secret())
    async with db.transaction() as conn:
        await conn.execute(
            insert(api_keys).values(
                id=key.id,
                name=name,
                key_hash=hash_api_key(api_key),
                key_prefix=api_key[:10],
                signing_secret=key.signing_secret,
                created_at=db.now(),
            )
        )
    return key


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


async def revoke_key(db: Database, key_id: str) -> bool:
    """Revoke a key at once; False if there is no such key. Revoking twice is not an error."""
    async with db.transaction() as conn:
        found = (await conn.execute(select(api_keys.c.id).where(api_keys.c.id == key_id))).first()
        if found is None:
            return False
        await conn.execute(
            update(api_keys)
            .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=db.now())
        )
    return True


async def authenticate(db: Database, key_hash: str) -> str | None:
    """The id of the live key with this hash, or None."""
    query = select(api_keys.c.id).where(
        api_keys.c.key_hash == key_hash, api_keys.c.revoked_at.is_(None)
    )
    async with db.reader() as conn:
        return (await conn.execute(query)).scalar_one_or_none()
