"""Creating subscriptions, the API's side: many creates in one transaction, idempotent per
key, generation and callback URL.

Owns the create path: authenticating the batch's keys, finding or creating each generation's
row (and waking idle or expired ones), inserting the new subscriptions and, for generations
already final, queueing their deliveries at once. It never polls and never sends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, case, func, literal, select, update
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
    """One create's answer: None subscription means the key was not valid, or (with
    `quota_exceeded`) that it already has its quota of active subscriptions."""

    subscription: Mapping[Any, Any] | None
    created: bool = False
    quota_exceeded: bool = False


@dataclass
class CreateBatchOutcome:
    results: list[CreateResult]
    polls_queued: bool = False
    deliveries_queued: bool = False
    # Active subscriptions after this batch, by key id, for the keys counted in it.
    active_counts: dict[str, int] = field(default_factory=dict)


async def create_subscriptions(
    db: Database, requests: Sequence[CreateRequest], max_active_per_key: int | None = None
) -> CreateBatchOutcome:
    """Create many subscriptions in one transaction (the API batches concurrent creates).

    Idempotent per (key, generation, callback URL) among active subscriptions. Starts polling
    for generations nobody was waiting for, and queues the delivery at once for generations
    already known to be final. For keys with a `count_active` request, new subscriptions
    past `max_active_per_key` active ones are refused (`quota_exceeded`).
    """

    async def work() -> CreateBatchOutcome:
        async with db.transaction() as conn:
            return await _create_subscriptions(
                conn, db.now(), requests, db.is_postgres, max_active_per_key
            )

    return await retrying(work, on_integrity_error=True)


async def _create_subscriptions(
    conn: AsyncConnection,
    now: datetime,
    requests: Sequence[CreateRequest],
    postgres: bool,
    max_active_per_key: int | None,
) -> CreateBatchOutcome:
    outcome = CreateBatchOutcome(results=[])
    hashes = {r.key_hash for r in requests}
    counted = {r.key_hash for r in requests if r.count_active} if max_active_per_key else set()
    live_keys = select(api_keys.c.key_hash, api_keys.c.id).where(
        any_of(api_keys.c.key_hash, sorted(hashes), postgres),
        api_keys.c.revoked_at.is_(None),
    )
    if postgres:
        # Shared, so creates never wait on each other; a revocation (which takes the row
        # for update) waits for this batch, then cancels what it made, or goes first. A key
        # whose quota is counted here is taken exclusively: its counted batches take turns.
        live_keys = live_keys.order_by(api_keys.c.id).with_for_update(read=not counted)
    key_rows = await conn.execute(live_keys)
    key_ids: dict[str, str] = {row.key_hash: row.id for row in key_rows}
    room: dict[str, int] = {}  # key id -> new active subscriptions it may still have
    if max_active_per_key:
        for key_hash in sorted(counted & set(key_ids)):
            counted_id = key_ids[key_hash]
            active = await count_active(conn, counted_id, max_active_per_key)
            room[counted_id] = max_active_per_key - active
            outcome.active_counts[counted_id] = active

    valid = [r for r in requests if r.key_hash in key_ids]
    gen_ids = sorted({r.generation_id for r in valid})
    first_key: dict[str, str] = {}  # a new or woken generation's fair key
    for request in valid:
        first_key.setdefault(request.generation_id, key_ids[request.key_hash])
    gens: dict[str, dict[str, Any]] = {}
    if gen_ids:
        gens = await _lock_or_create_generations(conn, now, first_key, postgres)

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
        gen = gens[request.generation_id]
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


async def _lock_or_create_generations(
    conn: AsyncConnection, now: datetime, first_key: Mapping[str, str], postgres: bool
) -> dict[str, dict[str, Any]]:
    """Lock (PostgreSQL) the generations' rows, creating missing ones; wake idle/expired ones
    (`first_key`: each generation's id and the key a new or woken one is polled for).
    Returns each generation's id, state, status and next_poll_at as they now are."""
    gen_ids = sorted(first_key)
    columns = (
        generations.c.id,
        generations.c.state,
        generations.c.status,
        generations.c.next_poll_at,
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
    await insert_rows(
        conn,
        generations,
        [new_generation_row(gid, now, first_key[gid]) for gid in missing],
        postgres,
    )
    asleep = (GenerationState.IDLE, GenerationState.EXPIRED)
    wake = [gid for gid, row in found.items() if row["state"] in asleep]
    if wake:
        # A new subscriber gives an idle generation its polling back, and an expired one a
        # fresh TTL: the relay gave up on it for earlier subscribers, not for this one.
        await conn.execute(
            update(generations)
            .where(generations.c.id == bindparam("w_id"))
            .values(
                fair_key=bindparam("w_key"),
                state=GenerationState.POLLING,
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
            ),
            [{"w_id": gid, "w_key": first_key[gid]} for gid in wake],
        )
    for gid in [*missing, *wake]:
        found[gid] = {
            "id": gid,
            "state": GenerationState.POLLING,
            "status": found.get(gid, {}).get("status"),
            "next_poll_at": now,
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
    }


def _case_expired_now(now: datetime) -> Any:
    return case(
        (
            generations.c.state == GenerationState.EXPIRED,
            literal(now, generations.c.first_subscribed_at.type),
        )
    )
