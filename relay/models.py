"""The relay's tables, as SQLAlchemy Core: the schema every query and migration agrees on.

Readable by operators with plain SQL: statuses are words, times are UTC, bodies are the JSON
text as received. No table holds a usable API key (only SHA-256 hashes of random keys), nor a signing secret in
the clear (they are sealed under RELAY_SECRET_KEY).

Scheduling columns double as leases: a claimed generation's `next_poll_at` (a delivery's
`next_attempt_at`) is pushed to the end of its lease and `lease_owner` names the claimer, so a
crashed process's work becomes due again by itself when the lease runs out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING)


# Status words, stored as the words themselves (StrEnum members are str, so they bind and
# compare as the plain words operators see in SQL).


class SubscriptionStatus(StrEnum):
    ACTIVE = "active"  # waiting for a final result, or delivering it
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"


class GenerationState(StrEnum):
    POLLING = "polling"
    IDLE = "idle"  # no active subscription
    FINAL = "final"
    EXPIRED = "expired"  # the relay gave up on it


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELED = "canceled"


class Listing(StrEnum):
    """What batch sweeps know of a generation: the running list showed it (`listed`); a
    complete list did not, so it is being fetched (`missing`); it was missing and still
    running when fetched, so it is of another workspace or not listed yet (`unlisted`:
    polled by id, and not fetched again for being absent); a list cut short no longer
    showed it (`dropped`: fetched, since it may have ended; if not, polled by id)."""

    LISTED = "listed"
    MISSING = "missing"
    UNLISTED = "unlisted"
    DROPPED = "dropped"


class IdempotencyState(StrEnum):
    IN_PROGRESS = "in_progress"  # its request is with the upstream; `owner` renews the lease
    DONE = "done"  # the answer is stored: every retry with the key gets it again
    # Nothing was created upstream: the answer went to the request (and to duplicates that
    # waited for it); the next request with the key may use it again.
    RELEASED = "released"


class CallbackEvent(StrEnum):
    COMPLETED = "generation.completed"
    FAILED = "generation.failed"
    CANCELED = "generation.canceled"
    EXPIRED = "generation.expired"


# The event a generation that ended upstream is delivered as, by its final upstream status
# (statuses.FINAL_STATUSES); a generation the relay gave up on is delivered as EXPIRED.
EVENT_BY_FINAL_STATUS: Mapping[str, CallbackEvent] = {
    "COMPLETED": CallbackEvent.COMPLETED,
    "FAILED": CallbackEvent.FAILED,
    "CANCELED": CallbackEvent.CANCELED,
}


def _as_utc(value: datetime) -> datetime:
    """`value` in UTC; a naive datetime is refused (whose time would it be?)."""
    if value.tzinfo is UTC:
        return value
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return value.astimezone(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on SQLite (naive text) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = _as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        """On SQLite, SQLAlchemy's DATETIME text written in one step: its own processor
        formats through a dict of fields, after the conversion above, for each of the 8
        timestamps of a create. The text is the same to the character."""
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        def process(value: datetime | None) -> str | None:
            if value is None:
                return None
            return _as_utc(value).replace(tzinfo=None).isoformat(" ", "microseconds")

        return process

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # raw SQL paths on SQLite
            value = datetime.fromisoformat(value)
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _now_column(name: str) -> Column[datetime]:
    return Column(name, UTCDateTime(), nullable=False)


api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("key_prefix", String(16), nullable=False),
    # HMAC needs the signing secret itself, so it cannot be hashed: it is sealed under
    # RELAY_SECRET_KEY (secretbox.py, "v1:..."), never stored in the clear. While a secret is
    # rotated, the one it replaced signs too, until previous_secret_until.
    Column("signing_secret", Text, nullable=False),
    Column("previous_signing_secret", Text, nullable=True),
    Column("previous_secret_until", UTCDateTime(), nullable=True),
    _now_column("created_at"),
    Column("revoked_at", UTCDateTime(), nullable=True),
)

generations = Table(
    "generations",
    metadata,
    Column("id", String(128), primary_key=True),
    # GenerationState: polling | idle (no active subscription) | final | expired (gave up)
    Column("state", String(16), nullable=False),
    Column("status", String(32), nullable=True),  # last status seen upstream, normalised
    Column("result", Text, nullable=True),  # final body as upstream sent it, or the relay's notice
    Column("first_subscribed_at", UTCDateTime(), nullable=False),
    Column("last_polled_at", UTCDateTime(), nullable=True),
    Column("next_poll_at", UTCDateTime(), nullable=True),
    Column("status_changed_at", UTCDateTime(), nullable=True),
    Column("final_at", UTCDateTime(), nullable=True),
    Column("poll_count", Integer, nullable=False, server_default=text("0")),
    Column("unchanged_polls", Integer, nullable=False, server_default=text("0")),
    Column("error_count", Integer, nullable=False, server_default=text("0")),
    Column("not_found_since", UTCDateTime(), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("lease_owner", String(40), nullable=True),
    # Push hints (the upstream's webhooks): the furthest status one named (a hint never moves
    # a generation back) and when the last arrived; set means push hints cover it.
    Column("hint_status", String(32), nullable=True),
    Column("hinted_at", UTCDateTime(), nullable=True),
    # Batch sweeps: Listing, and when the running list last showed it.
    Column("listing", String(16), nullable=True),
    Column("listed_at", UTCDateTime(), nullable=True),
    # The key whose share of the poll budget this generation's polls take: the key of its
    # first active subscription, handed to another watcher's key when that one stops.
    Column("fair_key", String(40), nullable=True),
    _now_column("created_at"),
    _now_column("updated_at"),
    # The key that created it through the relay (proxy.py): only that key may subscribe to
    # it. Null for generations created elsewhere. No foreign key: keys are never deleted, and
    # adding one would rebuild this table on SQLite.
    Column("owner_key_id", String(40), nullable=True),
    Index("ix_generations_due", "next_poll_at"),
    # Per key, its polling generations by due time: the fair claim walks the keys with due
    # work (few) instead of every due row.
    Index(
        "ix_generations_fair_due",
        "fair_key",
        "next_poll_at",
        sqlite_where=text("next_poll_at IS NOT NULL"),
        postgresql_where=text("next_poll_at IS NOT NULL"),
    ),
    Index("ix_generations_state_updated", "state", "updated_at"),
    # What earlier running lists showed: a list cut short makes only those due (sweeps).
    Index("ix_generations_listing", "listing", "listed_at"),
)

subscriptions = Table(
    "subscriptions",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("api_key_id", String(40), ForeignKey("api_keys.id"), nullable=False),
    Column("generation_id", String(128), ForeignKey("generations.id"), nullable=False),
    Column("callback_url", String(2048), nullable=False),
    Column("metadata", Text, nullable=True),
    # SubscriptionStatus: active | delivered | failed | canceled | expired
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text, nullable=True),
    _now_column("created_at"),
    _now_column("updated_at"),
    Column("delivered_at", UTCDateTime(), nullable=True),
    Index("ix_subscriptions_key_id", "api_key_id", "id"),
    Index("ix_subscriptions_generation_status", "generation_id", "status"),
    Index("ix_subscriptions_status_updated", "status", "updated_at"),
    # Idempotent create: one active subscription per key, generation and callback URL.
    Index(
        "uq_subscriptions_active_target",
        "api_key_id",
        "generation_id",
        "callback_url",
        unique=True,
        sqlite_where=text("status = 'active'"),
        postgresql_where=text("status = 'active'"),
    ),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("subscription_id", String(40), ForeignKey("subscriptions.id"), nullable=False),
    Column("webhook_id", String(40), nullable=False),
    # CallbackEvent: generation.completed | .failed | .canceled | .expired
    Column("event", String(32), nullable=False),
    Column("payload", Text, nullable=True),  # null: the generation's stored result
    # DeliveryStatus: pending | delivered | failed | canceled
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", UTCDateTime(), nullable=True),
    Column("lease_owner", String(40), nullable=True),
    Column("last_error", Text, nullable=True),
    # The receiver, "hostname:port" of the callback URL (addresses.receiver_host): a host
    # that is at its limit has its due deliveries pushed back in one statement.
    Column("host", String(300), nullable=True),
    _now_column("created_at"),
    _now_column("updated_at"),
    Index("ix_deliveries_due", "next_attempt_at"),
    Index(
        "ix_deliveries_host_due",
        "host",
        "next_attempt_at",
        sqlite_where=text("status = 'pending'"),
        postgresql_where=text("status = 'pending'"),
    ),
    Index("ix_deliveries_subscription", "subscription_id"),
)

# An attempt that did not get a 2xx (no answer, or any other status). The same text in the
# partial index and in the queries that use it, so both databases match them.
FAILED_ATTEMPT = "status_code IS NULL OR status_code < 200 OR status_code >= 300"

delivery_attempts = Table(
    "delivery_attempts",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column(
        "delivery_id",
        BigInteger().with_variant(Integer, "sqlite"),
        ForeignKey("deliveries.id"),
        nullable=False,
    ),
    Column("subscription_id", String(40), ForeignKey("subscriptions.id"), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("webhook_id", String(40), nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("duration_ms", Integer, nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("response_excerpt", Text, nullable=True),
    Index("ix_delivery_attempts_subscription", "subscription_id", "id"),
    Index("ix_delivery_attempts_delivery", "delivery_id"),
    # The dashboard: the last hour's attempts per minute, and the latest failures.
    Index("ix_delivery_attempts_started_at", "started_at"),
    Index(
        "ix_delivery_attempts_failed",
        "id",
        sqlite_where=text(FAILED_ATTEMPT),
        postgresql_where=text(FAILED_ATTEMPT),
    ),
)

# Push hints for generations nobody watches yet, kept RELAY_HINT_MEMORY seconds, so that the
# subscription that follows needs no first poll.
upstream_hints = Table(
    "upstream_hints",
    metadata,
    Column("generation_id", String(128), primary_key=True),
    Column("status", String(32), nullable=True),  # the furthest status hints named
    Column("received_at", UTCDateTime(), nullable=False),
    Index("ix_upstream_hints_received", "received_at"),
)

# Every upstream webhook accepted, by its `webhook-id`: a repeated one changes nothing.
upstream_webhooks = Table(
    "upstream_webhooks",
    metadata,
    Column("webhook_id", String(128), primary_key=True),
    Column("received_at", UTCDateTime(), nullable=False),
    Index("ix_upstream_webhooks_received", "received_at"),
)

# What every node must agree on, one row per name: `hints` (at: when the last push hint
# arrived), `sweep` (at: when the last sweep started; holder and until: the lease of the
# node sweeping now), `sweep_off` (until: sweeps resume after the upstream said it has no
# running list).
relay_state = Table(
    "relay_state",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("at", UTCDateTime(), nullable=True),
    Column("holder", String(40), nullable=True),
    Column("until", UTCDateTime(), nullable=True),
)

# Creates through the relay sent with an Idempotency-Key (proxy.py): one row per key and
# Idempotency-Key, kept 24 hours. The first request claims the row (in_progress, under a lease
# its process renews), and the stored answer is what every retry gets.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("api_key_id", String(40), ForeignKey("api_keys.id"), primary_key=True),
    Column("idempotency_key", String(255), primary_key=True),
    Column("request", String(512), nullable=False),  # method and path, "POST /v1/generation/..."
    # sha256 of Relay-Callback-Url and Relay-Metadata; of the body, once it was read whole.
    Column("target_sha256", String(64), nullable=False),
    Column("body_sha256", String(64), nullable=True),
    # IdempotencyState: in_progress | done | released
    Column("state", String(16), nullable=False),
    Column("owner", String(40), nullable=True),  # the node whose request holds it
    Column("locked_until", UTCDateTime(), nullable=True),  # the owner's lease
    # The answer: status, the headers passed on (JSON object), body as sent.
    Column("status_code", Integer, nullable=True),
    Column("response_headers", Text, nullable=True),
    Column("response_body", LargeBinary, nullable=True),
    Column("subscription_id", String(40), nullable=True),
    Column("generation_id", String(128), nullable=True),
    _now_column("created_at"),
    _now_column("updated_at"),
    Index("ix_idempotency_keys_created", "created_at"),
)
