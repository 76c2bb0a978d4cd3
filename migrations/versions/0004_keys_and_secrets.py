"""Keys and secrets: signing secrets sealed under RELAY_SECRET_KEY, rotation, and each
generation's fair key.

generations gains fair_key (whose share of the poll budget its polls take), backfilled for
polling generations from an active subscription, and the index the fair claim reads.

api_keys gains previous_signing_secret and previous_secret_until (a rotated-out secret signs
until then). Every signing secret still in the clear is sealed (relay.secretbox); that needs
the key, passed like the database URL (config.attributes["secret_key"], else
RELAY_SECRET_KEY). A database with no clear secrets migrates without one. The downgrade opens
them again, with the same key.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 12:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

from relay.config import Settings
from relay.secretbox import SecretBox, SecretKeyError, is_sealed

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SELECT = sa.text("SELECT id, signing_secret FROM api_keys ORDER BY id")
_UPDATE = sa.text("UPDATE api_keys SET signing_secret = :secret WHERE id = :id")


def _box() -> SecretBox:
    key = context.config.attributes.get("secret_key") or Settings.from_env().secret_key
    if not key:
        raise SecretKeyError(
            "RELAY_SECRET_KEY is needed to seal the signing secrets stored in the clear"
        )
    return SecretBox(str(key))


def upgrade() -> None:
    bind = op.get_bind()
    clear = [row for row in bind.execute(_SELECT) if not is_sealed(row.signing_secret)]
    # The key before any change: without it the database stays as it was (SQLite does not
    # take back DDL).
    box = _box() if clear else None
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("previous_signing_secret", sa.Text(), nullable=True))
        batch_op.add_column(
            sa.Column("previous_secret_until", sa.DateTime(timezone=True), nullable=True)
        )
    if box is not None:
        bind.execute(_UPDATE, [{"id": r.id, "secret": box.seal(r.signing_secret, r.id)} for r in clear])
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fair_key", sa.String(length=40), nullable=True))
    bind.execute(
        sa.text(
            "UPDATE generations SET fair_key = (SELECT min(s.api_key_id) FROM subscriptions s"
            " WHERE s.generation_id = generations.id AND s.status = 'active')"
            " WHERE state = 'polling'"
        )
    )
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.create_index(
            "ix_generations_fair_due",
            ["fair_key", "next_poll_at"],
            unique=False,
            sqlite_where=sa.text("next_poll_at IS NOT NULL"),
            postgresql_where=sa.text("next_poll_at IS NOT NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_generations_fair_due",
            sqlite_where=sa.text("next_poll_at IS NOT NULL"),
            postgresql_where=sa.text("next_poll_at IS NOT NULL"),
        )
        batch_op.drop_column("fair_key")
    bind = op.get_bind()
    sealed = [row for row in bind.execute(_SELECT) if is_sealed(row.signing_secret)]
    if sealed:
        box = _box()  # before any change, as in upgrade()
        bind.execute(_UPDATE, [{"id": r.id, "secret": box.open(r.signing_secret, r.id)} for r in sealed])
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("previous_secret_until")
        batch_op.drop_column("previous_signing_secret")
