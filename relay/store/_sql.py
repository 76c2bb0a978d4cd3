"""The store's shared SQL helpers: many rows per statement, whole-transaction retries, text
a column can hold, and the one shape of a new delivery row.

Private to relay.store: the table-family modules build their queries on these. Nothing here
knows a table family's rules (what is due, who may write what).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Insert, Table, any_, bindparam, func, insert, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import KeyedColumnElement

from relay.addresses import receiver_host
from relay.models import CallbackEvent, DeliveryStatus, deliveries
from relay.signing import new_message_id

T = TypeVar("T")

RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock, serialization failure


def _is_transient(exc: DBAPIError) -> bool:
    """A conflict between nodes that a retry of the whole transaction resolves."""
    return getattr(exc.orig, "sqlstate", None) in RETRYABLE_SQLSTATES


async def retrying(work: Callable[[], Awaitable[T]], *, on_integrity_error: bool = False) -> T:
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


def any_of(column: KeyedColumnElement[Any], values: Sequence[Any], postgres: bool) -> Any:
    """`column IN values`, as one array parameter on PostgreSQL."""
    if postgres:
        return column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))
    return column.in_(values)


@functools.cache
def _unnest_insert(table: Table, names: tuple[str, ...]) -> Insert:
    arrays = [bindparam(f"u_{name}", type_=ARRAY(table.c[name].type)) for name in names]
    source = func.unnest(*arrays).table_valued(*names).render_derived()
    return insert(table).from_select(names, select(*[source.c[n] for n in names]))


async def insert_rows(
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


def storable(text_value: str | None, limit: int = 4096) -> str | None:
    """Text as a column can hold it: PostgreSQL refuses NUL characters, and error texts and
    answer excerpts come from strangers."""
    if text_value is None:
        return None
    return text_value.replace("\x00", "\ufffd")[:limit]


async def cancel_deliveries(
    conn: AsyncConnection, which: ColumnElement[bool], now: datetime, reason: str | None = None
) -> None:
    """Cancel the deliveries `which` picks (pending ones: the caller says which), with
    `reason` as their last error when given."""
    values: dict[str, Any] = {
        "status": DeliveryStatus.CANCELED,
        "next_attempt_at": None,
        "lease_owner": None,
        "updated_at": now,
    }
    if reason is not None:
        values["last_error"] = reason
    await conn.execute(update(deliveries).where(which).values(values))


def delivery_row(
    sub_id: str, callback_url: str, event: CallbackEvent, payload: str | None, now: datetime
) -> dict[str, Any]:
    """A new pending delivery, due now, with a new webhook-id (`payload` None: the
    generation's stored result is sent)."""
    return {
        "subscription_id": sub_id,
        "host": receiver_host(callback_url),
        "webhook_id": new_message_id(),
        "event": event,
        "payload": payload,
        "status": DeliveryStatus.PENDING,
        "attempts": 0,
        "next_attempt_at": now,
        "lease_owner": None,
        "last_error": None,
        "created_at": now,
        "updated_at": now,
    }
