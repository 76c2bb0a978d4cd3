"""Migrations: an empty database goes to head, matches the models, goes back to base and up again.

Run on a SQLite file and on a new PostgreSQL database. `alembic check` compares the migrated
schema with `relay.models` (tables, columns, types, indexes), so a model changed without a
migration fails here. Two `relay migrate` processes started together on an empty PostgreSQL
database must both succeed and leave one schema, which is what the advisory lock in env.py is for.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from relay import migrate
from relay.models import metadata
from tests.conftest import drop_pg_database, pg_url_for_new_database, sync_count

RELAY_TABLES = {"api_keys", "generations", "subscriptions", "deliveries", "delivery_attempts"}
ROOT = Path(__file__).resolve().parent.parent


def head_revision() -> str:
    head = ScriptDirectory.from_config(migrate.alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def table_names(url: str) -> set[str]:
    async def run() -> set[str]:
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))
        finally:
            await engine.dispose()

    return asyncio.run(run())


def index_names(url: str, table: str) -> set[str]:
    async def run() -> set[str]:
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                indexes = await conn.run_sync(lambda sync: inspect(sync).get_indexes(table))
                return {str(index["name"]) for index in indexes}
        finally:
            await engine.dispose()

    return asyncio.run(run())


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """A database with nothing in it: a new SQLite file or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/empty.db"
        return
    url = pg_url_for_new_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


def test_the_models_cover_every_table_the_contract_names() -> None:
    """relay.models defines exactly the relay tables the contract and the issue name."""
    assert set(metadata.tables) == RELAY_TABLES


def test_upgrade_check_downgrade_upgrade(empty_url: str) -> None:
    """Empty → head has no drift from the models; → base leaves no relay table; → head again."""
    config = migrate.alembic_config(empty_url)
    assert table_names(empty_url) == set()

    migrate.upgrade(empty_url)
    assert table_names(empty_url) >= RELAY_TABLES
    assert sync_count(empty_url, "SELECT count(*) FROM alembic_version") == 1
    command.check(config)
    # The "what is due now" queries have their indexes.
    assert "ix_deliveries_due" in index_names(empty_url, "deliveries")

    migrate.downgrade(empty_url)
    assert table_names(empty_url) & RELAY_TABLES == set()
    assert table_names(empty_url) <= {"alembic_version"}
    # The check can fail: at base the database is behind the models.
    with pytest.raises(CommandError):
        command.check(config)

    migrate.upgrade(empty_url)
    assert table_names(empty_url) >= RELAY_TABLES
    command.check(config)


def test_upgrade_at_head_is_a_no_op(empty_url: str) -> None:
    """Upgrading a database already at head changes nothing and keeps one version row."""
    migrate.upgrade(empty_url)
    migrate.upgrade(empty_url)
    assert sync_count(empty_url, "SELECT count(*) FROM alembic_version") == 1
    assert (
        sync_count(
            empty_url,
            f"SELECT count(*) FROM alembic_version WHERE version_num = '{head_revision()}'",
        )
        == 1
    )


@pytest.mark.postgres
def test_two_migrate_processes_at_once_on_an_empty_postgres_database() -> None:
    """Two `relay migrate` started together both exit 0 and the schema is at head exactly once."""
    url = pg_url_for_new_database()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["RELAY_DATABASE_URL"] = url
    procs: list[subprocess.Popen[str]] = []
    try:
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "relay.cli", "migrate"],
                    env=env,
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        outcomes = [proc.communicate(timeout=60) for proc in procs]
        for proc, (_, stderr) in zip(procs, outcomes, strict=True):
            assert proc.returncode == 0, stderr
        assert sync_count(url, "SELECT count(*) FROM alembic_version") == 1
        assert (
            sync_count(
                url, f"SELECT count(*) FROM alembic_version WHERE version_num = '{head_revision()}'"
            )
            == 1
        )
        assert table_names(url) >= RELAY_TABLES
        command.check(migrate.alembic_config(url))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        drop_pg_database(url)
