"""Push hints and batch sweeps: what hints and the running list said of each generation, hints
for generations nobody watches yet, accepted webhook ids, and the state every node shares.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 12:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("hint_status", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("hinted_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("listing", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("listed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "upstream_hints",
        sa.Column("generation_id", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("generation_id", name=op.f("pk_upstream_hints")),
    )
    op.create_index("ix_upstream_hints_received", "upstream_hints", ["received_at"])
    op.create_table(
        "upstream_webhooks",
        sa.Column("webhook_id", sa.String(length=128), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("webhook_id", name=op.f("pk_upstream_webhooks")),
    )
    op.create_index("ix_upstream_webhooks_received", "upstream_webhooks", ["received_at"])
    op.create_table(
        "relay_state",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("holder", sa.String(length=40), nullable=True),
        sa.Column("until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_relay_state")),
    )


def downgrade() -> None:
    op.drop_table("relay_state")
    op.drop_index("ix_upstream_webhooks_received", table_name="upstream_webhooks")
    op.drop_table("upstream_webhooks")
    op.drop_index("ix_upstream_hints_received", table_name="upstream_hints")
    op.drop_table("upstream_hints")
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_column("listed_at")
        batch_op.drop_column("listing")
        batch_op.drop_column("hinted_at")
        batch_op.drop_column("hint_status")
