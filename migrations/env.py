"""Alembic environment: async, URL from relay's configuration, one migrator at a time.

The URL comes from `config.attributes["database_url"]` (set by `relay.migrate`) or else from
RELAY_DATABASE_URL through `relay.config`, never from alembic.ini; the secret key that seals
signing secrets likewise (`config.attributes["secret_key"]`, else RELAY_SECRET_KEY), read by
the migrations that need it. On PostgreSQL the upgrade
runs under a transaction-level advisory lock, so processes starting together on an empty
database migrate it once and the others wait, then find it at head.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from relay.config import Settings
from relay.models import metadata

MIGRATION_LOCK_ID = 0x72656C6179  # "relay"

config = context.config
target_metadata = metadata


def _database_url() -> str:
    url = config.attributes.get("database_url")
    return str(url) if url else Settings.from_env().database_url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        context.run_migrations()


async def _run_async() -> None:
    engine = create_async_engine(_database_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
