"""Creating subscriptions, the API's side: many creates in one transaction, idempotent per
key, generation and callback URL, and only by its owner for a generation created through
the relay (another key is told it does not exist).

Owns the create path: authenticating the batch's keys, finding or creating each generation's
row (and waking idle or expired ones), inserting the new subscriptions and, for generations
already final, queueing their deliveries at once. It never polls and never sends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
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
from relay.statuses import TERMINAL_RANK, status_rank
from relay.store._sql import any_of, delivery_row, insert_rows, retrying
from relay.store.hints import remembered_hints


@dataclass(frozen=True)
class CreateRequest:
    key_hash: str
    generation_id: str
    callback_url: str
    metadata_json: str | None


@dataclass(frozen=True)
class CreateResult:
    """One create's answer: None subscription means the key was not valid, or, with
    `not_found`, that the generation belongs to another key."""

    subscription: Mapping[Any, Any] | None
    created: bool = False
    not_found: bool = False


@dataclass(frozen=True)
class FirstPoll:
    """When a generation nobody was waiting for gets its first per-id poll: the detection
    mode's call (signals.py), applied here. A push hint remembered for it wins: a terminal
    one makes it due at once, an earlier stage sets its status and the safety-net delay."""

    delay_s: float = 0.0  # no hint remembered
    hint_memory_s: float | None = None  # None: push hints are off, nothing to look up
    hinted_delay_s: float = 0.0


@dataclass
class CreateBatchOutcome:
    results: list[CreateResult]
    polls_queued: bool = False
    deliveries_queued: bool = False


async def create_subscriptions(
    db: Database, requests: Sequence[CreateRequest], first_poll: FirstPoll = FirstPoll()
) -> CreateBatchOutcome:
    """Create many subscriptions in one transaction (the API batches concurrent creates).

    Idempotent per (key, generation, callback URL) among active subscriptions. Starts polling
    for generations nobody was waiting for, and queues the delivery at once for generations
    already known to be final.
    """

    async def work() -> CreateBatchOutcome:
        async with db.transaction() as conn:
            return await create_subscriptions_in(
                conn, db.now(), requests, first_poll, db.is_postgres
            )

    return await retrying(work, on_integrity_error=True)


async def create_subscriptions_in(
    conn: AsyncConnection,
    now: datetime,
    requests: Sequence[CreateRequest],
    first_poll: FirstPoll,
    postgres: bool,
) -> CreateBatchOutcome:
    """The create batch inside a transaction the caller holds (proxied.py commits a create
    through the relay with its Idempotency-Key in the same one)."""
    outcome = CreateBatchOutcome(results=[])
    hashes = {r.key_hash for r in requests}
    key_rows = await conn.execute(
        select(api_keys.c.key_hash, api_keys.c.id).where(
            any_of(api_keys.c.key_hash, sorted(hashes), postgres),
            api_keys.c.revoked_at.is_(None),
        )
    )
    key_ids: dict[str, str] = {row.key_hash: row.id for row in key_rows}

    wanted_by: dict[str, set[str]] = {}
    for r in requests:
        if r.key_hash in key_ids:
            wanted_by.setdefault(r.generation_id, set()).add(key_ids[r.key_hash])
    gen_ids = sorted(wanted_by)
    gens: dict[str, dict[str, Any]] = {}
    if gen_ids:
        gens = await _lock_or_create_generations(
            conn, now, gen_ids, first_poll, postgres, wanted_by
        )

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


async def _lock_or_create_generations(
    conn: AsyncConnection,
    now: datetime,
    gen_ids: list[str],
    first_poll: FirstPoll,
    postgres: bool,
    wanted_by: Mapping[str, set[str]],
) -> dict[str, dict[str, Any]]:
    """Lock (PostgreSQL) the generations' rows, creating missing ones; wake idle/expired ones
    that a key in `wanted_by` may subscribe to. Returns each generation's id, state, status,
    next_poll_at and owner_key_id as they now are."""
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
    starts = await _first_polls(conn, now, [*missing, *wake], first_poll, postgres)
    await insert_rows(
        conn,
        generations,
        [new_generation_row(gid, now) | starts[gid] for gid in missing],
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
        await _set_first_polls(conn, {gid: starts[gid] for gid in wake})
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


async def _first_polls(
    conn: AsyncConnection,
    now: datetime,
    gen_ids: Sequence[str],
    first_poll: FirstPoll,
    postgres: bool,
) -> dict[str, dict[str, Any]]:
    """Each starting generation's first poll, and what a remembered push hint said of it."""
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


async def _set_first_polls(conn: AsyncConnection, starts: dict[str, dict[str, Any]]) -> None:
    """Write woken generations' first polls, one statement per shape of start."""
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


def new_generation_row(gen_id: str, now: datetime) -> dict[str, Any]:
    """A generation nobody was waiting for: polling, its first poll due now."""
    return {
        "id": gen_id,
        "state": GenerationState.POLLING,
        "status": None,
        "first_subscribed_at": now,
        "next_poll_at": now,
        "created_at": now,
        "updated_at": now,
        # Set by a remembered push hint (creates._first_polls); every row has the same keys,
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
