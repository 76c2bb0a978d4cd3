"""Every query the relay makes. Nothing else writes SQL.

Units of work are short transactions. Claims of due work (`claim_due_generations`,
`claim_due_deliveries`) lease rows by pushing their due time to the end of the lease and
naming the owner; on PostgreSQL they use `FOR UPDATE SKIP LOCKED` so nodes never wait on each
other. Every completion checks that the caller still owns the lease, so a process whose lease
ran out cannot overwrite the work of the one that took over.

Lock order, for every writer that takes more than one: generation, then deliveries, then
subscriptions (create, cancel, record a poll, record attempts, redeliver). Nodes therefore
do not deadlock on each other in the common paths, and a transaction that still loses such a
race is retried whole (`_retrying`). A subscription cannot be left active on a generation
that stopped polling: create and cancel both lock the generation row first.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    Insert,
    Table,
    and_,
    any_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import KeyedColumnElement

from relay.addresses import receiver_host
from relay.database import Database
from relay.ids import new_id
from relay.models import (
    UTCDateTime,
    api_keys,
    deliveries,
    delivery_attempts,
    generations,
    subscriptions,
)
from relay.signing import generate_secret, new_message_id

T = TypeVar("T")
logger = logging.getLogger(__name__)
EVENT_BY_STATUS = {
    "COMPLETED": "generation.completed",
    "FAILED": "generation.failed",
    "CANCELED": "generation.canceled",
}
EXPIRED_EVENT = "generation.expired"
PRUNE_LOCK_ID = 0x72656C6170  # advisory lock: one pruning node at a time


RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock, serialization failure


def _is_transient(exc: DBAPIError) -> bool:
    """A conflict between nodes that a retry of the whole transaction resolves."""
    return getattr(exc.orig, "sqlstate", None) in RETRYABLE_SQLSTATES


async def _retrying(work: Callable[[], Awaitable[T]], *, on_integrity_error: bool = False) -> T:
    """Run a whole transaction again when it lost a race with another node: a deadlock or
    serialization failure, or (for idempotent creates) a unique row another node just wrote."""
    for attempt in range(5):
        try:
            return await work()
        except DBAPIError as exc:
            retry = _is_transient(exc) or (on_integrity_error and isinstance(exc, IntegrityError))
            if attempt == 4 or not retry:
                raise
    raise AssertionError("unreachable")


# --- Many rows per statement ------------------------------------------------------------------
# On PostgreSQL a batch is sent as arrays: one `= ANY($1)` instead of an IN list whose length
# makes every batch size a new prepared statement, and one INSERT ... SELECT FROM unnest($1,
# $2, ...) instead of executemany's bind and execute per row. The create path's profile was
# dominated by those; SQLite keeps the portable forms.


def _any_of(column: KeyedColumnElement[Any], values: Sequence[Any], postgres: bool) -> Any:
    """`column IN values`, as one array parameter on PostgreSQL."""
    if postgres:
        return column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))
    return column.in_(values)


@functools.cache
def _unnest_insert(table: Table, names: tuple[str, ...]) -> Insert:
    arrays = [bindparam(f"u_{name}", type_=ARRAY(table.c[name].type)) for name in names]
    source = func.unnest(*arrays).table_valued(*names).render_derived()
    return insert(table).from_select(names, select(*[source.c[n] for n in names]))


async def _insert_rows(
    conn: AsyncConnection, table: Table, rows: Sequence[Mapping[str, Any]], postgres: bool
) -> None:
    """Insert rows that all have the same keys, in one statement on PostgreSQL."""
    if not rows:
        return
    if not postgres:
        await conn.execute(insert(table), list(rows))
        return
    names = tuple(rows[0])
    columns = {f"u_{name}": [row[name] for row in rows] for name in names}
    await conn.execute(_unnest_insert(table, names), columns)


def hash_api_key(api_key: str) -> str:
    """SHA-256 of a key: keys are 256-bit random, so a plain hash is enough to make a copy of
    the database useless for calling the API."""
    return hashlib.sha256(api_key.encode()).hexdigest()


# --- API keys -------------------------------------------------------------------------------


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


# --- Subscriptions: the API's side ----------------------------------------------------------

SUBSCRIPTION_COLUMNS = (
    subscriptions.c.id,
    subscriptions.c.generation_id,
    subscriptions.c.callback_url,
    subscriptions.c.metadata,
    subscriptions.c.status,
    generations.c.status.label("generation_status"),
    subscriptions.c.attempts,
    subscriptions.c.last_error,
    subscriptions.c.created_at,
    subscriptions.c.updated_at,
    subscriptions.c.delivered_at,
)


@dataclass(frozen=True)
class CreateRequest:
    key_hash: str
    generation_id: str
    callback_url: str
    metadata_json: str | None


@dataclass(frozen=True)
class CreateResult:
    """One create's answer: None subscription means the key was not valid."""

    subscription: Mapping[Any, Any] | None
    created: bool = False


@dataclass
class CreateBatchOutcome:
    results: list[CreateResult]
    polls_queued: bool = False
    deliveries_queued: bool = False


async def create_subscriptions(
    db: Database, requests: Sequence[CreateRequest]
) -> CreateBatchOutcome:
    """Create many subscriptions in one transaction (the API batches concurrent creates).

    Idempotent per (key, generation, callback URL) among active subscriptions. Starts polling
    for generations nobody was waiting for, and queues the delivery at once for generations
    already known to be final.
    """

    async def work() -> CreateBatchOutcome:
        async with db.transaction() as conn:
            return await _create_subscriptions(conn, db.now(), requests, db.is_postgres)

    return await _retrying(work, on_integrity_error=True)


async def _create_subscriptions(
    conn: AsyncConnection, now: datetime, requests: Sequence[CreateRequest], postgres: bool
) -> CreateBatchOutcome:
    outcome = CreateBatchOutcome(results=[])
    hashes = {r.key_hash for r in requests}
    key_rows = await conn.execute(
        select(api_keys.c.key_hash, api_keys.c.id).where(
            _any_of(api_keys.c.key_hash, sorted(hashes), postgres),
            api_keys.c.revoked_at.is_(None),
        )
    )
    key_ids: dict[str, str] = {row.key_hash: row.id for row in key_rows}

    valid = [r for r in requests if r.key_hash in key_ids]
    gen_ids = sorted({r.generation_id for r in valid})
    gens: dict[str, dict[str, Any]] = {}
    if gen_ids:
        gens = await _lock_or_create_generations(conn, now, gen_ids, postgres)

    existing: dict[tuple[str, str, str], dict[str, Any]] = {}
    if gen_ids:
        # By generation alone (ix_subscriptions_generation_status), keys matched here: given
        # the keys too, PostgreSQL's estimates on a fast-growing table chose the partial
        # unique index by key and filtered every subscription of those keys; and a row-value
        # IN over the three columns makes SQLite scan every active subscription.
        rows = await conn.execute(
            select(subscriptions).where(
                _any_of(subscriptions.c.generation_id, gen_ids, postgres),
                subscriptions.c.status == "active",
            )
        )
        for found in rows.mappings():
            triple = (found["api_key_id"], found["generation_id"], found["callback_url"])
            generation_status = gens[found["generation_id"]]["status"]
            existing[triple] = {**found, "generation_status": generation_status}

    new_rows: list[dict[str, Any]] = []
    new_deliveries: list[dict[str, Any]] = []
    for request in requests:
        key_id = key_ids.get(request.key_hash)
        if key_id is None:
            outcome.results.append(CreateResult(subscription=None))
            continue
        triple = (key_id, request.generation_id, request.callback_url)
        if triple in existing:
            outcome.results.append(CreateResult(subscription=existing[triple], created=False))
            continue
        gen = gens[request.generation_id]
        row: dict[str, Any] = {
            "id": new_id("sub"),
            "api_key_id": key_id,
            "generation_id": request.generation_id,
            "callback_url": request.callback_url,
            "metadata": request.metadata_json,
            "status": "active",
            "attempts": 0,
            "last_error": None,
            "created_at": now,
            "updated_at": now,
            "delivered_at": None,
        }
        new_rows.append(row)
        existing[triple] = {**row, "generation_status": gen["status"]}
        outcome.results.append(CreateResult(subscription=existing[triple], created=True))
        if gen["state"] == "final":
            # Late registration: the result is known, deliver without another poll.
            new_deliveries.append(
                _delivery_row(
                    row["id"], request.callback_url, EVENT_BY_STATUS[gen["status"]], None, now
                )
            )
        elif (
            gen["state"] == "polling"
            and gen["next_poll_at"] is not None
            and gen["next_poll_at"] <= now
        ):
            outcome.polls_queued = True
    await _insert_rows(conn, subscriptions, new_rows, postgres)
    if new_deliveries:
        await _insert_rows(conn, deliveries, new_deliveries, postgres)
        outcome.deliveries_queued = True
    return outcome


async def _lock_or_create_generations(
    conn: AsyncConnection, now: datetime, gen_ids: list[str], postgres: bool
) -> dict[str, dict[str, Any]]:
    """Lock (PostgreSQL) the generations' rows, creating missing ones; wake idle/expired ones.
    Returns each generation's id, state, status and next_poll_at as they now are."""
    columns = (
        generations.c.id,
        generations.c.state,
        generations.c.status,
        generations.c.next_poll_at,
    )
    query = (
        select(*columns)
        .where(_any_of(generations.c.id, gen_ids, postgres))
        .order_by(generations.c.id)
    )
    if postgres:
        query = query.with_for_update()
    found: dict[str, dict[str, Any]] = {
        row["id"]: dict(row) for row in (await conn.execute(query)).mappings()
    }
    missing = [gid for gid in gen_ids if gid not in found]
    if missing:
        await _insert_rows(
            conn,
            generations,
            [
                {
                    "id": gid,
                    "state": "polling",
                    "status": None,
                    "first_subscribed_at": now,
                    "next_poll_at": now,
                    "created_at": now,
                    "updated_at": now,
                }
                for gid in missing
            ],
            postgres,
        )
    wake = [gid for gid, row in found.items() if row["state"] in ("idle", "expired")]
    if wake:
        # A new subscriber gives an idle generation its polling back, and an expired one a
        # fresh TTL: the relay gave up on it for earlier subscribers, not for this one.
        await conn.execute(
            update(generations)
            .where(_any_of(generations.c.id, wake, postgres))
            .values(
                state="polling",
                next_poll_at=now,
                updated_at=now,
                first_subscribed_at=func.coalesce(
                    # idle keeps its TTL clock; expired starts a new one
                    _case_expired_now(now),
                    generations.c.first_subscribed_at,
                ),
                not_found_since=None,
                result=None,
                unchanged_polls=0,
                error_count=0,
            )
        )
    for gid in [*missing, *wake]:
        found[gid] = {
            "id": gid,
            "state": "polling",
            "status": found.get(gid, {}).get("status"),
            "next_poll_at": now,
        }
    return found


def _case_expired_now(now: datetime) -> Any:
    return case(
        (generations.c.state == "expired", literal(now, generations.c.first_subscribed_at.type))
    )


async def get_subscription(db: Database, key_id: str, sub_id: str) -> RowMapping | None:
    query = (
        select(*SUBSCRIPTION_COLUMNS)
        .join(generations, generations.c.id == subscriptions.c.generation_id)
        .where(subscriptions.c.id == sub_id, subscriptions.c.api_key_id == key_id)
    )
    async with db.reader() as conn:
        return (await conn.execute(query)).mappings().first()


async def list_subscriptions(
    db: Database,
    key_id: str,
    *,
    status: str | None,
    generation_id: str | None,
    limit: int,
    before_id: str | None,
) -> tuple[list[RowMapping], bool]:
    """Newest first (ids sort by creation time); returns (rows, whether more exist)."""
    query = (
        select(*SUBSCRIPTION_COLUMNS)
        .join(generations, generations.c.id == subscriptions.c.generation_id)
        .where(subscriptions.c.api_key_id == key_id)
        .order_by(subscriptions.c.id.desc())
        .limit(limit + 1)
    )
    if status is not None:
        query = query.where(subscriptions.c.status == status)
    if generation_id is not None:
        query = query.where(subscriptions.c.generation_id == generation_id)
    if before_id is not None:
        query = query.where(subscriptions.c.id < before_id)
    async with db.reader() as conn:
        rows = list((await conn.execute(query)).mappings())
    return rows[:limit], len(rows) > limit


async def cancel_subscription(db: Database, key_id: str, sub_id: str) -> RowMapping | None:
    """Cancel an active subscription (a final one stays as it was); None if not this key's.

    Stops polling its generation when no active subscription remains.
    """
    return await _retrying(lambda: _cancel_once(db, key_id, sub_id))


async def _cancel_once(db: Database, key_id: str, sub_id: str) -> RowMapping | None:
    now = db.now()
    async with db.transaction() as conn:
        gen_id = (
            await conn.execute(
                select(subscriptions.c.generation_id).where(
                    subscriptions.c.id == sub_id, subscriptions.c.api_key_id == key_id
                )
            )
        ).scalar_one_or_none()
        if gen_id is None:
            return None
        if db.is_postgres:
            # Lock order: generation, then deliveries, then subscription (as every writer).
            await conn.execute(
                select(generations.c.id).where(generations.c.id == gen_id).with_for_update()
            )
            await conn.execute(
                select(deliveries.c.id)
                .where(deliveries.c.subscription_id == sub_id, deliveries.c.status == "pending")
                .order_by(deliveries.c.id)
                .with_for_update()
            )
        changed = await conn.execute(
            update(subscriptions)
            .where(subscriptions.c.id == sub_id, subscriptions.c.status == "active")
            .values(status="canceled", updated_at=now)
        )
        if changed.rowcount:
            await conn.execute(
                update(deliveries)
                .where(deliveries.c.subscription_id == sub_id, deliveries.c.status == "pending")
                .values(status="canceled", next_attempt_at=None, lease_owner=None, updated_at=now)
            )
            await _idle_if_unwatched(conn, gen_id, now)
        return (
            (
                await conn.execute(
                    select(*SUBSCRIPTION_COLUMNS)
                    .join(generations, generations.c.id == subscriptions.c.generation_id)
                    .where(subscriptions.c.id == sub_id)
                )
            )
            .mappings()
            .one()
        )


async def _idle_if_unwatched(conn: AsyncConnection, gen_id: str, now: datetime) -> None:
    active = (
        await conn.execute(
            select(func.count())
            .select_from(subscriptions)
            .where(subscriptions.c.generation_id == gen_id, subscriptions.c.status == "active")
        )
    ).scalar_one()
    if active == 0:
        await conn.execute(
            update(generations)
            .where(generations.c.id == gen_id, generations.c.state == "polling")
            .values(state="idle", next_poll_at=None, lease_owner=None, updated_at=now)
        )


async def list_attempts(db: Database, key_id: str, sub_id: str) -> list[RowMapping] | None:
    """Oldest first; None if the subscription is not this key's."""
    async with db.reader() as conn:
        owned = (
            await conn.execute(
                select(subscriptions.c.id).where(
                    subscriptions.c.id == sub_id, subscriptions.c.api_key_id == key_id
                )
            )
        ).first()
        if owned is None:
            return None
        query = (
            select(
                delivery_attempts.c.attempt,
                delivery_attempts.c.webhook_id,
                delivery_attempts.c.started_at,
                delivery_attempts.c.duration_ms,
                delivery_attempts.c.status_code,
                delivery_attempts.c.error,
                delivery_attempts.c.response_excerpt,
            )
            .where(delivery_attempts.c.subscription_id == sub_id)
            .order_by(delivery_attempts.c.id)
        )
        return list((await conn.execute(query)).mappings())


class RedeliverConflict(Exception):
    """Nothing to redeliver; the message says why."""


async def redeliver(db: Database, key_id: str, sub_id: str) -> RowMapping | None:
    """Queue the stored final message again, with the same webhook-id.

    None if the subscription is not this key's; RedeliverConflict if there is nothing to send.
    A delivery still pending is made due now instead of being doubled. A `failed`
    subscription becomes `active` until the new delivery ends; `delivered` and `expired`
    stay as they are (a failed redelivery does not undo a delivery that happened).
    """
    return await _retrying(lambda: _redeliver_once(db, key_id, sub_id))


async def _redeliver_once(db: Database, key_id: str, sub_id: str) -> RowMapping | None:
    now = db.now()
    async with db.transaction() as conn:
        sub = (
            await conn.execute(
                select(
                    subscriptions.c.id, subscriptions.c.status, subscriptions.c.callback_url
                ).where(subscriptions.c.id == sub_id, subscriptions.c.api_key_id == key_id)
            )
        ).first()
        if sub is None:
            return None
        if sub.status == "canceled":
            raise RedeliverConflict("the subscription is canceled")
        # Deliveries before subscriptions: the lock order attempt recording uses.
        last_query = (
            select(deliveries)
            .where(deliveries.c.subscription_id == sub_id)
            .order_by(deliveries.c.id.desc())
            .limit(1)
        )
        if db.is_postgres:
            last_query = last_query.with_for_update()
        last = (await conn.execute(last_query)).mappings().first()
        if last is None:
            raise RedeliverConflict("the generation has no final result yet")
        if last["status"] == "pending":
            # Waiting for a retry: make it due now. Leased (being sent): nothing to add.
            await conn.execute(
                update(deliveries)
                .where(
                    deliveries.c.id == last["id"],
                    deliveries.c.status == "pending",
                    deliveries.c.lease_owner.is_(None),
                )
                .values(next_attempt_at=now, updated_at=now)
            )
        else:
            row = _delivery_row(sub_id, sub.callback_url, last["event"], last["payload"], now)
            row["webhook_id"] = last["webhook_id"]
            await conn.execute(insert(deliveries).values(**row))
        if sub.status == "failed":
            try:
                await conn.execute(
                    update(subscriptions)
                    .where(subscriptions.c.id == sub_id)
                    .values(status="active", updated_at=now)
                )
            except IntegrityError:
                raise RedeliverConflict(
                    "another active subscription of this key has the same generation and "
                    "callback URL"
                ) from None
        return (
            (
                await conn.execute(
                    select(*SUBSCRIPTION_COLUMNS)
                    .join(generations, generations.c.id == subscriptions.c.generation_id)
                    .where(subscriptions.c.id == sub_id)
                )
            )
            .mappings()
            .one()
        )


def _delivery_row(
    sub_id: str, callback_url: str, event: str, payload: str | None, now: datetime
) -> dict[str, Any]:
    return {
        "subscription_id": sub_id,
        "host": receiver_host(callback_url),
        "webhook_id": new_message_id(),
        "event": event,
        "payload": payload,
        "status": "pending",
        "attempts": 0,
        "next_attempt_at": now,
        "lease_owner": None,
        "last_error": None,
        "created_at": now,
        "updated_at": now,
    }


# --- Polling: the worker's side -------------------------------------------------------------


@dataclass(frozen=True)
class ClaimedGeneration:
    id: str
    status: str | None
    first_subscribed_at: datetime
    status_changed_at: datetime | None
    unchanged_polls: int
    error_count: int
    not_found_since: datetime | None


async def claim_due_generations(
    db: Database, owner: str, limit: int, lease_s: float
) -> list[ClaimedGeneration]:
    """Lease up to `limit` generations whose poll is due, oldest due first."""
    now = db.now()
    due = (
        select(generations.c.id)
        .where(generations.c.next_poll_at <= now)
        .order_by(generations.c.next_poll_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    claim = (
        update(generations)
        .where(generations.c.id.in_(due.scalar_subquery()))
        .values(next_poll_at=now + timedelta(seconds=lease_s), lease_owner=owner)
        .returning(
            generations.c.id,
            generations.c.status,
            generations.c.first_subscribed_at,
            generations.c.status_changed_at,
            generations.c.unchanged_polls,
            generations.c.error_count,
            generations.c.not_found_since,
        )
    )
    async with db.transaction() as conn:
        rows = (await conn.execute(claim)).mappings().all()
    return [ClaimedGeneration(**row) for row in rows]


async def renew_generation_leases(
    db: Database, owner: str, ids: Sequence[str], lease_s: float
) -> None:
    if not ids:
        return
    until = db.now() + timedelta(seconds=lease_s)
    # SKIP LOCKED: a row busy in another transaction is renewed next round instead of
    # making this multi-row update wait (and deadlock) on it.
    held = (
        select(generations.c.id)
        .where(
            _any_of(generations.c.id, ids, db.is_postgres),
            generations.c.lease_owner == owner,
            generations.c.state == "polling",
        )
        .with_for_update(skip_locked=True)
    )
    async with db.transaction() as conn:
        await conn.execute(
            update(generations)
            .where(generations.c.id.in_(held.scalar_subquery()))
            .values(next_poll_at=until)
        )


@dataclass(frozen=True)
class PollRecord:
    """What one poll changes on its generation. `event` set: the generation is done
    (final or given up) and `result` is what every active subscriber gets."""

    generation_id: str
    values: Mapping[str, Any]
    event: str | None = None
    notice_payload: str | None = None


async def _record_polls_once(db: Database, owner: str, records: Sequence[PollRecord]) -> list[bool]:
    now = db.now()
    async with db.transaction() as conn:
        held_query = (
            select(generations.c.id)
            .where(
                _any_of(generations.c.id, [r.generation_id for r in records], db.is_postgres),
                generations.c.lease_owner == owner,
                generations.c.state == "polling",
            )
            .order_by(generations.c.id)
        )
        if db.is_postgres:
            held_query = held_query.with_for_update()
        held = set((await conn.execute(held_query)).scalars())
        # One executemany per shape of change (final, error, still running...).
        by_shape: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for record in records:
            if record.generation_id not in held:
                continue
            values = {**record.values, "updated_at": now}
            shape = tuple(sorted(values))
            by_shape.setdefault(shape, []).append(
                {"g_id": record.generation_id, **{f"v_{k}": v for k, v in values.items()}}
            )
        for shape, rows in by_shape.items():
            await conn.execute(
                update(generations)
                .where(generations.c.id == bindparam("g_id"))
                .values(
                    poll_count=generations.c.poll_count + 1,
                    **{k: bindparam(f"v_{k}", type_=generations.c[k].type) for k in shape},
                ),
                rows,
            )
        ended = {
            r.generation_id: r for r in records if r.event is not None and r.generation_id in held
        }
        if ended:
            subs = await conn.execute(
                select(
                    subscriptions.c.id,
                    subscriptions.c.generation_id,
                    subscriptions.c.callback_url,
                ).where(
                    _any_of(subscriptions.c.generation_id, list(ended), db.is_postgres),
                    subscriptions.c.status == "active",
                )
            )
            rows = []
            for sub_id, gen_id, callback_url in subs:
                record = ended[gen_id]
                assert record.event is not None
                rows.append(
                    _delivery_row(sub_id, callback_url, record.event, record.notice_payload, now)
                )
            if rows:
                await _insert_rows(conn, deliveries, rows, db.is_postgres)
    return [r.generation_id in held for r in records]


async def record_polls(db: Database, owner: str, records: Sequence[PollRecord]) -> list[bool]:
    """Apply polls' outcomes and, for each that ends its generation, queue one delivery per
    active subscription, all in one transaction. Each answer is False where the lease was
    lost (nothing written for that generation)."""
    return await _retrying(lambda: _record_polls_once(db, owner, records))


# --- Delivering: the worker's side ----------------------------------------------------------


@dataclass(frozen=True)
class ClaimedDelivery:
    id: int
    subscription_id: str
    webhook_id: str
    event: str
    attempts: int  # attempts of this delivery so far
    subscription_attempts: int  # attempts of the subscription so far (numbering)
    callback_url: str
    host: str  # addresses.receiver_host(callback_url)
    signing_secret: str
    body: bytes


async def claim_due_deliveries(
    db: Database, owner: str, limit: int, lease_s: float
) -> list[ClaimedDelivery]:
    """Lease up to `limit` due deliveries with everything needed to send them."""
    now = db.now()
    due = (
        select(deliveries.c.id)
        .where(deliveries.c.next_attempt_at <= now, deliveries.c.status == "pending")
        .order_by(deliveries.c.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    claim = (
        update(deliveries)
        .where(deliveries.c.id.in_(due.scalar_subquery()))
        .values(next_attempt_at=now + timedelta(seconds=lease_s), lease_owner=owner)
        .returning(deliveries.c.id)
    )
    async with db.transaction() as conn:
        ids = (await conn.execute(claim)).scalars().all()
        if not ids:
            return []
        rows = (
            (
                await conn.execute(
                    select(
                        deliveries.c.id,
                        deliveries.c.subscription_id,
                        deliveries.c.webhook_id,
                        deliveries.c.event,
                        deliveries.c.attempts,
                        deliveries.c.payload,
                        deliveries.c.host,
                        subscriptions.c.attempts.label("subscription_attempts"),
                        subscriptions.c.callback_url,
                        api_keys.c.signing_secret,
                        generations.c.result,
                    )
                    .join(subscriptions, subscriptions.c.id == deliveries.c.subscription_id)
                    .join(api_keys, api_keys.c.id == subscriptions.c.api_key_id)
                    .join(generations, generations.c.id == subscriptions.c.generation_id)
                    .where(_any_of(deliveries.c.id, ids, db.is_postgres))
                )
            )
            .mappings()
            .all()
        )
    claimed = []
    bodies: dict[str, bytes] = {}  # one copy of a result, however many subscribers share it
    for row in rows:
        text_body = row["payload"] if row["payload"] is not None else row["result"]
        if text_body is None:
            logger.error("delivery %s has no body to send; it is sent as {}", row["id"])
            text_body = "{}"
        body = bodies.setdefault(text_body, text_body.encode())
        claimed.append(
            ClaimedDelivery(
                id=row["id"],
                subscription_id=row["subscription_id"],
                webhook_id=row["webhook_id"],
                event=row["event"],
                attempts=row["attempts"],
                subscription_attempts=row["subscription_attempts"],
                callback_url=row["callback_url"],
                host=row["host"] or receiver_host(row["callback_url"]),
                signing_secret=row["signing_secret"],
                body=body,
            )
        )
    return claimed


async def renew_delivery_leases(
    db: Database, owner: str, ids: Sequence[int], lease_s: float
) -> None:
    if not ids:
        return
    until = db.now() + timedelta(seconds=lease_s)
    held = (
        select(deliveries.c.id)
        .where(
            _any_of(deliveries.c.id, ids, db.is_postgres),
            deliveries.c.lease_owner == owner,
            deliveries.c.status == "pending",
        )
        .with_for_update(skip_locked=True)
    )
    async with db.transaction() as conn:
        await conn.execute(
            update(deliveries)
            .where(deliveries.c.id.in_(held.scalar_subquery()))
            .values(next_attempt_at=until)
        )


async def release_deliveries(db: Database, owner: str, ids: Sequence[int]) -> None:
    """Give deliveries this owner leased back unattempted, due now (the deliverer is closing
    and had them waiting for their host)."""
    if not ids:
        return
    now = db.now()
    async with db.transaction() as conn:
        await conn.execute(
            update(deliveries)
            .where(
                _any_of(deliveries.c.id, ids, db.is_postgres),
                deliveries.c.lease_owner == owner,
                deliveries.c.status == "pending",
            )
            .values(next_attempt_at=now, lease_owner=None)
        )


HOST_DEFER_BATCH = 1000  # bounds one deferral's UPDATE, however large the host's backlog


@dataclass(frozen=True)
class HostDeferral:
    """A host at its limit: the deliveries claimed for it beyond the limit, and for how long
    to give them, and the host's other due deliveries, back."""

    claimed_ids: Sequence[int]
    delay_s: float


async def defer_hosts(db: Database, owner: str, hosts: Mapping[str, HostDeferral]) -> int:
    """Push back, by each host's delay, the deliveries this owner claimed for it and up to
    HOST_DEFER_BATCH of its other due deliveries that nobody holds (earliest first). A lease,
    even one that ran out while its holder is still sending, is never taken: only the claimed
    ids (this owner's) and unleased rows change. A receiver that hangs with a large backlog
    thus costs two statements per deferral instead of a claim and a deferral per delivery.
    Returns how many deliveries were deferred."""
    if not hosts:
        return 0

    async def work() -> int:
        now = db.now()
        deferred = 0
        async with db.transaction() as conn:
            for host, deferral in sorted(hosts.items()):
                deferred += await _defer_host(conn, db.is_postgres, owner, host, deferral, now)
        return deferred

    return await _retrying(work)


async def _defer_host(
    conn: AsyncConnection,
    postgres: bool,
    owner: str,
    host: str,
    deferral: HostDeferral,
    now: datetime,
) -> int:
    backlog = (
        select(deliveries.c.id)
        .where(
            deliveries.c.host == host,
            deliveries.c.status == "pending",
            deliveries.c.next_attempt_at <= now,
            deliveries.c.lease_owner.is_(None),
        )
        .order_by(deliveries.c.next_attempt_at)
        .limit(HOST_DEFER_BATCH)
        .with_for_update(skip_locked=True)
    )
    unleased = list((await conn.execute(backlog)).scalars())
    # By id, not by host: a claimed delivery written without a host (an older node's) is
    # given back too.
    mine = and_(
        _any_of(deliveries.c.id, deferral.claimed_ids, postgres),
        deliveries.c.lease_owner == owner,
    )
    free = and_(_any_of(deliveries.c.id, unleased, postgres), deliveries.c.lease_owner.is_(None))
    result = await conn.execute(
        update(deliveries)
        .where(deliveries.c.status == "pending", or_(mine, free))
        .values(next_attempt_at=now + timedelta(seconds=deferral.delay_s), lease_owner=None)
    )
    return int(result.rowcount)


@dataclass(frozen=True)
class AttemptRecord:
    delivery_id: int
    subscription_id: str
    webhook_id: str
    event: str
    attempt_number: int  # the subscription-wide number sent as relay-attempt
    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str | None
    response_excerpt: str | None
    action: str  # done | retry | fail
    retry_at: datetime | None


async def _record_attempts_once(db: Database, owner: str, records: Sequence[AttemptRecord]) -> None:
    """Record finished attempts and apply their decisions, in one transaction.

    Each attempt row is kept even if the lease was lost (it happened); the delivery and the
    subscription change only while the lease is still ours.
    """
    if not records:
        return
    now = db.now()
    async with db.transaction() as conn:
        await conn.execute(
            insert(delivery_attempts),
            [
                {
                    "delivery_id": r.delivery_id,
                    "subscription_id": r.subscription_id,
                    "attempt": r.attempt_number,
                    "webhook_id": r.webhook_id,
                    "started_at": r.started_at,
                    "duration_ms": r.duration_ms,
                    "status_code": r.status_code,
                    "error": storable(r.error),
                    "response_excerpt": storable(r.response_excerpt),
                }
                for r in records
            ],
        )
        # Which leases are still ours (locked, so no node can take one before we update it).
        ids = [r.delivery_id for r in records]
        held_query = select(deliveries.c.id).where(
            _any_of(deliveries.c.id, ids, db.is_postgres),
            deliveries.c.lease_owner == owner,
            deliveries.c.status == "pending",
        )
        if db.is_postgres:
            held_query = held_query.with_for_update()
        held = set((await conn.execute(held_query)).scalars())
        delivery_updates = []
        settled: list[dict[str, Any]] = []  # subscriptions whose delivery ended
        retried: list[dict[str, Any]] = []
        unheld: list[dict[str, Any]] = []
        for r in records:
            error = None if r.action == "done" else _error_text(r)
            if r.delivery_id in held:
                delivery_updates.append(
                    {
                        "d_id": r.delivery_id,
                        "d_status": {"done": "delivered", "fail": "failed"}.get(
                            r.action, "pending"
                        ),
                        "d_next": r.retry_at if r.action == "retry" else None,
                        "d_error": error,
                    }
                )
            if r.delivery_id in held and r.action != "retry":
                if r.event == EXPIRED_EVENT:
                    final_status = "expired"
                else:
                    final_status = "delivered" if r.action == "done" else "failed"
                settled.append(
                    {
                        "s_id": r.subscription_id,
                        "s_error": error,
                        "s_status": final_status,
                        "s_delivered_at": now if r.action == "done" else None,
                    }
                )
            elif r.delivery_id in held:
                retried.append({"s_id": r.subscription_id, "s_error": error})
            else:
                # The lease was lost: the attempt happened and is counted, but another node
                # owns the delivery now and its outcome is the one the subscription shows.
                unheld.append({"s_id": r.subscription_id})
        if delivery_updates:
            await conn.execute(
                update(deliveries)
                .where(
                    deliveries.c.id == bindparam("d_id"),
                    deliveries.c.lease_owner == owner,
                    deliveries.c.status == "pending",
                )
                .values(
                    attempts=deliveries.c.attempts + 1,
                    status=bindparam("d_status"),
                    next_attempt_at=bindparam("d_next"),
                    lease_owner=None,
                    last_error=bindparam("d_error"),
                    updated_at=now,
                ),
                delivery_updates,
            )
        if settled:
            await conn.execute(
                update(subscriptions)
                .where(subscriptions.c.id == bindparam("s_id"))
                .values(
                    attempts=subscriptions.c.attempts + 1,
                    updated_at=now,
                    last_error=bindparam("s_error"),
                    # Only an active subscription changes status: a canceled one stays so.
                    status=case(
                        (subscriptions.c.status == "active", bindparam("s_status")),
                        else_=subscriptions.c.status,
                    ),
                    delivered_at=func.coalesce(
                        bindparam("s_delivered_at", type_=UTCDateTime()),
                        subscriptions.c.delivered_at,
                    ),
                ),
                settled,
            )
        if retried:
            await conn.execute(
                update(subscriptions)
                .where(subscriptions.c.id == bindparam("s_id"))
                .values(
                    attempts=subscriptions.c.attempts + 1,
                    updated_at=now,
                    last_error=bindparam("s_error"),
                ),
                retried,
            )
        if unheld:
            await conn.execute(
                update(subscriptions)
                .where(subscriptions.c.id == bindparam("s_id"))
                .values(attempts=subscriptions.c.attempts + 1),
                unheld,
            )


async def record_attempts(db: Database, owner: str, records: Sequence[AttemptRecord]) -> None:
    """Record finished attempts and apply their decisions, in one transaction (retried
    whole on a deadlock; rows are updated in id order so nodes rarely meet one)."""
    ordered = sorted(records, key=lambda r: r.delivery_id)
    await _retrying(lambda: _record_attempts_once(db, owner, ordered))


def _error_text(r: AttemptRecord) -> str:
    return storable(r.error) or f"HTTP {r.status_code}"


def storable(text_value: str | None, limit: int = 4096) -> str | None:
    """Text as a column can hold it: PostgreSQL refuses NUL characters, and error texts and
    answer excerpts come from strangers."""
    if text_value is None:
        return None
    return text_value.replace("\x00", "\ufffd")[:limit]


# --- Housekeeping ---------------------------------------------------------------------------


async def prune(db: Database, older_than_s: float, batch: int = 500) -> int:
    """Delete finished subscriptions (and their deliveries and attempts) and finished
    generations older than the retention period, in batches; one node at a time.
    Returns the number of subscriptions deleted."""
    cutoff = db.now() - timedelta(seconds=older_than_s)
    total = 0
    while True:
        async with db.transaction() as conn:
            if db.is_postgres:
                got = (
                    await conn.execute(
                        text("SELECT pg_try_advisory_xact_lock(:id)"), {"id": PRUNE_LOCK_ID}
                    )
                ).scalar_one()
                if not got:
                    return total
            # Locked, so a redelivery cannot revive one of them while it is being deleted.
            ids = (
                (
                    await conn.execute(
                        select(subscriptions.c.id)
                        .where(
                            subscriptions.c.status != "active", subscriptions.c.updated_at < cutoff
                        )
                        .limit(batch)
                        .with_for_update(skip_locked=True)
                    )
                )
                .scalars()
                .all()
            )
            if ids:
                await conn.execute(
                    delete(delivery_attempts).where(
                        _any_of(delivery_attempts.c.subscription_id, ids, db.is_postgres)
                    )
                )
                await conn.execute(
                    delete(deliveries).where(
                        _any_of(deliveries.c.subscription_id, ids, db.is_postgres)
                    )
                )
                # Re-checked here: a redelivery may have made one active since the select.
                await conn.execute(
                    delete(subscriptions).where(
                        _any_of(subscriptions.c.id, ids, db.is_postgres),
                        subscriptions.c.status != "active",
                        subscriptions.c.updated_at < cutoff,
                    )
                )
            else:
                orphaned = (
                    select(generations.c.id)
                    .where(
                        generations.c.state != "polling",
                        generations.c.updated_at < cutoff,
                        ~select(subscriptions.c.id)
                        .where(subscriptions.c.generation_id == generations.c.id)
                        .exists(),
                    )
                    .limit(batch)
                )
                gen_ids = (await conn.execute(orphaned)).scalars().all()
                if gen_ids:
                    await conn.execute(
                        delete(generations).where(
                            _any_of(generations.c.id, gen_ids, db.is_postgres)
                        )
                    )
        total += len(ids)
        if not ids and not gen_ids:
            return total
