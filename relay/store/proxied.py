"""Recording a generation created through the relay: its subscription, in one transaction.

Owns the commit that follows the upstream's answer to a create: the subscription is made
through the create path of creates.py (the same rules, the same generation row), the
generation is marked as the creating key's own, with the status the create's answer showed,
its polls are handed to the stream that follows it (if one does: streams.py), and the
request's Idempotency-Key, if any, is settled with the answer, all at once: a retry either
finds the answer and the subscription, or neither. It never calls the upstream
and never decides what to answer (proxy.py does).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import case, func, literal, update
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.database import Database
from relay.models import generations
from relay.store._sql import retrying
from relay.store.creates import (
    CreateOptions,
    CreateRequest,
    FirstPoll,
    create_subscriptions_in,
)
from relay.store.idempotency import Settlement, settle_idempotency_key_in
from relay.store.streams import lease_to_stream


@dataclass(frozen=True)
class ProxiedCreate:
    """A generation the upstream just created for a key, and the subscription it asks for."""

    key_hash: str
    generation_id: str
    callback_url: str
    metadata_json: str | None
    # The status the create's answer showed (normalised), if any.
    generation_status: str | None
    # The Idempotency-Key to settle as done with the answer (its subscription id filled in).
    settlement: Settlement | None = None
    # Set when this process follows the generation's event stream: no polls meanwhile.
    stream_owner: str | None = None
    stream_lease_s: float = 0.0
    # When its first per-id poll comes (push hints and sweeps may make it wait).
    first_poll: FirstPoll = field(default_factory=FirstPoll)


@dataclass(frozen=True)
class ProxiedOutcome:
    """The subscription made (None: the key was revoked meanwhile), and what to wake."""

    subscription: Mapping[Any, Any] | None
    polls_queued: bool
    deliveries_queued: bool
    settled: bool = False  # the Idempotency-Key was still held and now holds the answer


async def record_proxied_create(db: Database, create: ProxiedCreate) -> ProxiedOutcome:
    """Subscribe the key to the generation it created, in one transaction."""

    async def work() -> ProxiedOutcome:
        async with db.transaction() as conn:
            return await _record(conn, db, create)

    return await retrying(work, on_integrity_error=True)


async def _record(conn: AsyncConnection, db: Database, create: ProxiedCreate) -> ProxiedOutcome:
    now = db.now()
    request = CreateRequest(
        create.key_hash, create.generation_id, create.callback_url, create.metadata_json
    )
    options = CreateOptions(first_poll=create.first_poll)
    outcome = await create_subscriptions_in(conn, now, [request], options, db.is_postgres)
    (result,) = outcome.results
    if result.subscription is not None:
        # The key that created it owns it. The create's answer is the first status seen:
        # shown at once, and the first poll counts from it.
        gen = generations.c
        values: dict[str, Any] = {
            "owner_key_id": func.coalesce(gen.owner_key_id, result.subscription["api_key_id"]),
            "updated_at": now,
        }
        if create.generation_status is not None:
            values["status"] = func.coalesce(gen.status, create.generation_status)
            values["status_changed_at"] = case(
                (gen.status.is_(None), literal(now, gen.status_changed_at.type)),
                else_=gen.status_changed_at,
            )
        await conn.execute(update(generations).where(gen.id == create.generation_id).values(values))
        if create.stream_owner is not None:
            await lease_to_stream(
                conn, now, create.generation_id, create.stream_owner, create.stream_lease_s
            )
    settled = False
    if create.settlement is not None and create.settlement.answer is not None:
        sub_id = None if result.subscription is None else result.subscription["id"]
        answer = replace(create.settlement.answer, subscription_id=sub_id)
        settlement = replace(create.settlement, answer=answer)
        settled = await settle_idempotency_key_in(conn, now, settlement)
    polls_queued = outcome.polls_queued and create.stream_owner is None
    return ProxiedOutcome(result.subscription, polls_queued, outcome.deliveries_queued, settled)
