"""The operator's lookups, across every key: list subscriptions, find one (or a generation's)
with its deliveries and attempts, and redeliver one.

For the dashboard's search box and `relay subscriptions list|show|redeliver`: the client
API's reads (subscriptions.py) are scoped to the calling key, these are not, so nothing on the
client API's side may call them. Read-only but for `redeliver`, which is subscriptions.py's
`redeliver` for the subscription's own key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, Select, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.database import Database
from relay.models import api_keys, deliveries, delivery_attempts, generations, subscriptions
from relay.store._sql import any_of
from relay.store.subscriptions import SUBSCRIPTION_COLUMNS, redeliver

SUBSCRIPTIONS_PER_GENERATION = 50  # what a search for a generation shows at most


def _view(*where: ColumnElement[bool]) -> Select[tuple[object, ...]]:
    """Subscriptions as the API shows them, and which key they belong to."""
    return (
        select(*SUBSCRIPTION_COLUMNS, api_keys.c.id.label("key_id"), api_keys.c.name.label("key"))
        .join(generations, generations.c.id == subscriptions.c.generation_id)
        .join(api_keys, api_keys.c.id == subscriptions.c.api_key_id)
        .where(*where)
    )


async def list_all_subscriptions(
    db: Database,
    *,
    status: str | None = None,
    generation_id: str | None = None,
    limit: int = 50,
) -> list[RowMapping]:
    """Every key's subscriptions, newest first."""
    query = _view().order_by(subscriptions.c.id.desc()).limit(limit)
    if status is not None:
        query = query.where(subscriptions.c.status == status)
    if generation_id is not None:
        query = query.where(subscriptions.c.generation_id == generation_id)
    async with db.reader() as conn:
        return list((await conn.execute(query)).mappings())


@dataclass
class Found:
    """What a search found: a generation, its (or one) subscription(s), and for each
    subscription its deliveries and attempts, oldest first."""

    generation: RowMapping | None
    subscriptions: list[RowMapping]
    deliveries: dict[str, list[RowMapping]] = field(default_factory=dict)
    attempts: dict[str, list[RowMapping]] = field(default_factory=dict)


async def find(db: Database, query: str) -> Found | None:
    """The subscription with id `query`, else the generation with that id and its
    subscriptions (the newest SUBSCRIPTIONS_PER_GENERATION); None if neither exists."""
    query = query.strip()
    if not query or len(query) > 128:
        return None
    async with db.reader() as conn:
        subs = list((await conn.execute(_view(subscriptions.c.id == query))).mappings())
        gen_id = subs[0]["generation_id"] if subs else query
        generation = (
            (await conn.execute(select(generations).where(generations.c.id == gen_id)))
            .mappings()
            .first()
        )
        if generation is None:
            return None
        if not subs:
            subs = list(
                (
                    await conn.execute(
                        _view(subscriptions.c.generation_id == gen_id)
                        .order_by(subscriptions.c.id.desc())
                        .limit(SUBSCRIPTIONS_PER_GENERATION)
                    )
                ).mappings()
            )
        found = Found(generation, subs)
        await _add_history(conn, found, db.is_postgres)
    return found


async def _add_history(conn: AsyncConnection, found: Found, postgres: bool) -> None:
    ids = [sub["id"] for sub in found.subscriptions]
    if not ids:
        return
    for sub_id in ids:
        found.deliveries[sub_id] = []
        found.attempts[sub_id] = []
    for table, by_subscription in (
        (deliveries, found.deliveries),
        (delivery_attempts, found.attempts),
    ):
        rows = await conn.execute(
            select(table).where(any_of(table.c.subscription_id, ids, postgres)).order_by(table.c.id)
        )
        for row in rows.mappings():
            by_subscription[row["subscription_id"]].append(row)


async def redeliver_any(db: Database, sub_id: str) -> RowMapping | None:
    """Queue a subscription's stored final message again, whatever its key (the operator's
    redeliver); None if there is no such subscription. Raises RedeliverConflict like the
    client API's redeliver when there is nothing to send."""
    async with db.reader() as conn:
        key_id = (
            await conn.execute(
                select(subscriptions.c.api_key_id).where(subscriptions.c.id == sub_id)
            )
        ).scalar_one_or_none()
    if key_id is None:
        return None
    return await redeliver(db, key_id, sub_id)
