"""The dashboard's indexes on delivery_attempts: by start time (the last hour's chart) and the
failed attempts alone (the latest failures), so neither reads the whole table.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 12:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# relay.models.FAILED_ATTEMPT, written out: a migration must not change when the models do.
FAILED_ATTEMPT = "status_code IS NULL OR status_code < 200 OR status_code >= 300"


def upgrade() -> None:
    with op.batch_alter_table("delivery_attempts", schema=None) as batch_op:
        batch_op.create_index("ix_delivery_attempts_started_at", ["started_at"], unique=False)
        batch_op.create_index(
            "ix_delivery_attempts_failed",
            ["id"],
            unique=False,
            sqlite_where=sa.text(FAILED_ATTEMPT),
            postgresql_where=sa.text(FAILED_ATTEMPT),
        )


def downgrade() -> None:
    with op.batch_alter_table("delivery_attempts", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_delivery_attempts_failed",
            sqlite_where=sa.text(FAILED_ATTEMPT),
            postgresql_where=sa.text(FAILED_ATTEMPT),
        )
        batch_op.drop_index("ix_delivery_attempts_started_at")
