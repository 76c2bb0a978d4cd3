"""Creating subscriptions, the API's side: many creates in one transaction, idempotent per
key, generation and callback URL, within a key's quota of active subscriptions, and only by
its owner for a generation created through the relay (another key is told it does not
exist).

Owns the create path: authenticating the batch's keys, finding or creating each generation's
row (and waking idle or expired ones), inserting the new subscriptions and, for generations
already final, queueing their deliveries at once. It never polls and never sends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, literal, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.database import Database
from relay.ids import new_id
from relay.models import (
    EVENT_BY_FINAL_STATUS,
    GenerationState,
    SubscriptionStatus,
    api_keys,
    deliveries,
    generations,
    subscriptions,
)
from relay.store._sql import any_of, delivery_row, insert_rows, retrying
from relay.store.starts import FirstPoll, first_polls, set_first_polls

__all__ = [
    "CreateBatchOutcome",
    "CreateOptions",
    "CreateRequest",
    "CreateResult",
    "FirstPoll",
    "active_subscriptions",
    "count_active",
    "create_subscriptions",
    "create_subscriptions_in",
    "new_generation_row",
    "new_subscription_row",
]


@dataclass(frozen=True)
class CreateRequest:
    key_hash: str
    generation_id: str
    callback_url: str
    metadata_json: str | None
    # Count the key's active subscriptions in the transaction and refuse new ones past
    # `max_active_per_key` (the API asks for it when its estimate is near the quota or old).
    count_active: bool = False


@dataclass(frozen=True)
class CreateResult:
    """One create's answer: None subscription means the key was not valid, or that the
    generation belongs to another key (`not_found`), or that the key already has its quota
    of active subscriptions (`quota_exceeded`)."""

    subscription: Mapping[Any, Any] | None
    created: bool = False
    not_found: bool = False
    quota_exceeded: bool = False


@dataclass
class CreateBatchOutcome:
    results: list[CreateResult]
    polls_queued: bool = False
    deliveries_queued: bool = False
    # Active subscriptions after this batch, by key id, for the keys counted in it.
    active_counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class CreateOptions:
    """What the caller decides for a batch: when new generations are first polled (push
    hints, sweeps), and the cap on a key's active subscriptions (None: no counting)."""

    first_poll: FirstPoll = field(default_factory=FirstPoll)
    max_active_per_key: int | None = None


async def create_subscriptions(
    db: Database, requests: Sequence[CreateRequest], options: CreateOptions | None = None
) -> CreateBatchOutcome:
    """Create many subscriptions in one transaction (the API batches concurrent creates).

    Idempotent per (key, generation, callback URL) among active subscriptions. Starts polling
    for generations nobody was waiting for, and queues the delivery at once for generations
    already known to be final. For keys with a `count_active` request, new subscriptions
    past `max_active_per_key` active ones are refused (`quota_exceeded`).
    """
    chosen = options or CreateOptions()

    async def work() -> CreateBatchOutcome:
        async with db.transaction() as conn:
            return await create_subscriptions_in(conn, db.now(), requests, chosen, db.is_postgres)

    return await retrying(work, on_integrity_error=True)


async def create_subscriptions_in(
    conn: AsyncConnection,
    now: datetime,
    requests: Sequence[CreateRequest],
    options: CreateOptions,
    postgres: bool,
) -> CreateBatchOutcome:
    """The create batch inside a transaction the caller holds (proxied.py commits a create
    through the relay with its Idempotency-Key in the same one)."""
    outcome = CreateBatchOutcome(results=[])
    cap = options.max_active_per_key
    key_ids = await _lock_keys(conn, requests, cap, postgres)
    room: dict[str, int] = {}  # key id -> new active subscriptions it may still have
    if cap:
        for key_hash in sorted({r.key_hash for r in requests if r.count_active} & set(key_ids)):
            counted_id = key_ids[key_hash]
            active = await count_active(conn, counted_id, cap)
            room[counted_id] = cap - active
            outcome.active_counts[counted_id] = active

    wanted_by: dict[str, list[str]] = {}  # the keys asking for each generation, in order
    for r in requests:
        if r.key_hash in key_ids:
            wanted_by.setdefault(r.generation_id, []).append(key_ids[r.key_hash])
    gen_ids = sorted(wanted_by)
    gens: dict[str, dict[str, Any]] = {}
    if gen_ids:
        gens = await _lock_or_create_generations(conn, now, wanted_by, options.first_poll, postgres)

    existing: dict[tuple[str, str, str], dict[str, Any]] = {}
    if gen_ids:
        # By generation alone (ix_subscriptions_generation_status), keys matched here: given
        # the keys too, PostgreSQL's estimates on a fast-growing table chose the partial
        # unique index by key and filtered every subscription of those keys; and a row-value
        # IN over the three columns makes SQLite scan every active subscription.
        rows = await conn.execute(
            select(subscriptions).where(
                any_of(subscriptions.c.generation_id, gen_ids, postgres),
                subscriptions.c.status == SubscriptionStatus.ACTIVE,
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
        gen = gens[request.generation_id]
        if gen["owner_key_id"] not in (None, key_id):
            outcome.results.append(CreateResult(subscription=None, not_found=True))
            continue
        triple = (key_id, request.generation_id, request.callback_url)
        if triple in existing:
            outcome.results.append(CreateResult(subscription=existing[triple], created=False))
            continue
        if key_id in room:
            if room[key_id] <= 0:
                outcome.results.append(CreateResult(subscription=None, quota_exceeded=True))
                continue
            room[key_id] -= 1
            outcome.active_counts[key_id] += 1
        row = new_subscription_row(
            key_id, request.generation_id, request.callback_url, request.metadata_json, now
        )
        new_rows.append(row)
        existing[triple] = {**row, "generation_status": gen["status"]}
        outcome.results.append(CreateResult(subscription=existing[triple], created=True))
        if gen["state"] == GenerationState.FINAL:
            # Late registration: the result is known, deliver without another poll.
            event = EVENT_BY_FINAL_STATUS[gen["status"]]
            new_deliveries.append(delivery_row(row["id"], request.callback_url, event, None, now))
        elif (
            gen["state"] == GenerationState.POLLING
            and gen["next_poll_at"] is not None
            and gen["next_poll_at"] <= now
        ):
            outcome.polls_queued = True
    await insert_rows(conn, subscriptions, new_rows, postgres)
    if new_deliveries:
        await insert_rows(conn, deliveries, new_deliveries, postgres)
        outcome.deliveries_queued = True
    return outcome


async def _lock_keys(
    conn: AsyncConnection, requests: Sequence[CreateRequest], cap: int | None, postgres: bool
) -> dict[str, str]:
    """The live keys of the batch, by hash, their rows held for the transaction on
    PostgreSQL: shared, so creates never wait on each other, while a revocation (which takes
    the row for update) waits for this batch, then cancels what it made, or goes first. A key
    whose quota is counted here is taken exclusively: its counted batches take turns."""
    hashes = sorted({r.key_hash for r in requests})
    counted = bool(cap) and any(r.count_active for r in requests)
    live_keys = select(api_keys.c.key_hash, api_keys.c.id).where(
        any_of(api_keys.c.key_hash, hashes, postgres), api_keys.c.revoked_at.is_(None)
    )
    if postgres:
        live_keys = live_keys.order_by(api_keys.c.id).with_for_update(read=not counted)
    return {row.key_hash: row.id for row in await conn.execute(live_keys)}


async def count_active(conn: AsyncConnection, key_id: str, cap: int) -> int:
    """The key's active subscriptions, counted up to `cap` (an index-only range of the
    partial unique index, which leads with the key)."""
    active = (
        select(literal(1))
        .select_from(subscriptions)
        .where(
            subscriptions.c.api_key_id == key_id,
            subscriptions.c.status == SubscriptionStatus.ACTIVE,
        )
        .limit(cap)
        .subquery()
    )
    return int((await conn.execute(select(func.count()).select_from(active))).scalar_one())


async def active_subscriptions(db: Database, key_id: str, cap: int) -> int:
    """The key's active subscriptions, counted up to `cap`, outside any create (a create
    through the relay checks its quota before the upstream is asked to create anything)."""
    async with db.reader() as conn:
        return await count_active(conn, key_id, cap)


async def _lock_or_create_generations(
    conn: AsyncConnection,
    now: datetime,
    wanted_by: Mapping[str, Sequence[str]],
    first_poll: FirstPoll,
    postgres: bool,
) -> dict[str, dict[str, Any]]:
    """Lock (PostgreSQL) the generations' rows, creating missing ones; wake idle/expired ones
    that a key in `wanted_by` may subscribe to (a generation created through the relay only
    by its owner). A new or woken generation is polled for its first asking key's share of
    the poll budget (`fair_key`). Returns each generation's id, state, status, next_poll_at
    and owner_key_id as they now are."""
    gen_ids = sorted(wanted_by)
    columns = (
        generations.c.id,
        generations.c.state,
        generations.c.status,
        generations.c.next_poll_at,
        generations.c.owner_key_id,
    )
    query = (
        select(*columns)
        .where(any_of(generations.c.id, gen_ids, postgres))
        .order_by(generations.c.id)
    )
    if postgres:
        query = query.with_for_update()
    found: dict[str, dict[str, Any]] = {
        row["id"]: dict(row) for row in (await conn.execute(query)).mappings()
    }
    missing = [gid for gid in gen_ids if gid not in found]
    asleep = (GenerationState.IDLE, GenerationState.EXPIRED)
    wake = [
        gid
        for gid, row in found.items()
        if row["state"] in asleep and row["owner_key_id"] in (None, *wanted_by[gid])
    ]
    starts = await first_polls(conn, now, [*missing, *wake], first_poll, postgres)
    await insert_rows(
        conn,
        generations,
        [new_generation_row(gid, now, wanted_by[gid][0]) | starts[gid] for gid in missing],
        postgres,
    )
    if wake:
        # A new subscriber gives an idle generation its polling back, and an expired one a
        # fresh TTL: the relay gave up on it for earlier subscribers, not for this one.
        await conn.execute(
            update(generations)
            .where(any_of(generations.c.id, wake, postgres))
            .values(
                state=GenerationState.POLLING,
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
                listing=None,
            )
        )
        await set_first_polls(
            conn, {gid: {**starts[gid], "fair_key": wanted_by[gid][0]} for gid in wake}
        )
    for gid in [*missing, *wake]:
        start = starts[gid]
        found[gid] = {
            "id": gid,
            "state": GenerationState.POLLING,
            "status": start.get("status", found.get(gid, {}).get("status")),
            "next_poll_at": start["next_poll_at"],
            "owner_key_id": found.get(gid, {}).get("owner_key_id"),
        }
    return found


def new_subscription_row(
    key_id: str, gen_id: str, callback_url: str, metadata_json: str | None, now: datetime
) -> dict[str, Any]:
    """A new active subscription, with a new id."""
    return {
        "id": new_id("sub"),
        "api_key_id": key_id,
        "generation_id": gen_id,
        "callback_url": callback_url,
        "metadata": metadata_json,
        "status": SubscriptionStatus.ACTIVE,
        "attempts": 0,
        "last_error": None,
        "created_at": now,
        "updated_at": now,
        "delivered_at": None,
    }


def new_generation_row(gen_id: str, now: datetime, fair_key: str | None) -> dict[str, Any]:
    """A generation nobody was waiting for: polling for `fair_key`, its first poll due now."""
    return {
        "id": gen_id,
        "fair_key": fair_key,
        "state": GenerationState.POLLING,
        "status": None,
        "first_subscribed_at": now,
        "next_poll_at": now,
        "created_at": now,
        "updated_at": now,
        # Set by a remembered push hint (starts.first_polls); every row has the same keys,
        # so a batch is one insert.
        "status_changed_at": None,
        "hint_status": None,
        "hinted_at": None,
    }


def _case_expired_now(now: datetime) -> Any:
    return case(
        (
            generations.c.state == GenerationState.EXPIRED,
            literal(now, generations.c.first_subscribed_at.type),
        )
    )
