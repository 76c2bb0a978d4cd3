"""An index on generations (listing, listed_at): a sweep whose running list was cut short
makes due only the generations an earlier list showed, and without it that UPDATE read every
polling generation, on every sweep (about one a second at 100,000 pending).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 12:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.create_index("ix_generations_listing", ["listing", "listed_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_index("ix_generations_listing")
