"""Deliveries name their receiver host, so a host at its limit is deferred in one statement.

Pending deliveries are backfilled from their subscription's callback URL; finished ones keep a
NULL host (nothing reads it for them).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 17:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from relay.addresses import receiver_host

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BACKFILL_BATCH = 1000


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("host", sa.String(length=300), nullable=True))
    _backfill_pending_hosts()
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_deliveries_host_due",
            ["host", "next_attempt_at"],
            unique=False,
            sqlite_where=sa.text("status = 'pending'"),
            postgresql_where=sa.text("status = 'pending'"),
        )


def _backfill_pending_hosts() -> None:
    bind = op.get_bind()
    pending = sa.text(
        "SELECT d.id, s.callback_url FROM deliveries d"
        " JOIN subscriptions s ON s.id = d.subscription_id"
        " WHERE d.status = 'pending' AND d.host IS NULL AND d.id > :after"
        " ORDER BY d.id LIMIT :batch"
    )
    set_host = sa.text("UPDATE deliveries SET host = :host WHERE id = :id")
    after = 0
    while True:
        rows = bind.execute(pending, {"after": after, "batch": BACKFILL_BATCH}).all()
        if not rows:
            return
        bind.execute(set_host, [{"id": row.id, "host": receiver_host(row.callback_url)} for row in rows])
        after = rows[-1].id


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_deliveries_host_due",
            sqlite_where=sa.text("status = 'pending'"),
            postgresql_where=sa.text("status = 'pending'"),
        )
        batch_op.drop_column("host")
