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
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from relay import migrate
from relay.models import metadata
from relay.secretbox import SecretBox, SecretKeyError
from tests.helpers import TEST_SECRET_KEY, drop_pg_database, pg_url_for_new_database, sync_count

RELAY_TABLES = {
    "api_keys",
    "generations",
    "subscriptions",
    "deliveries",
    "delivery_attempts",
    "upstream_hints",
    "upstream_webhooks",
    "relay_state",
    "idempotency_keys",
}
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


def test_0002_names_the_host_of_pending_deliveries(empty_url: str) -> None:
    """A database at 0001 with deliveries in it: upgrading fills in the receiver host of the
    pending ones (the claims group by it) and leaves finished ones alone; down and up again."""
    migrate.upgrade(empty_url, "0001")
    now = "2026-11-28 12:00:00"
    statements = [
        "INSERT INTO api_keys (id, name, key_hash, key_prefix, signing_secret, created_at)"
        f" VALUES ('key_1', 'k', 'h', 'p', 's', '{now}')",
        "INSERT INTO generations (id, state, status, first_subscribed_at, created_at, updated_at)"
        f" VALUES ('gen_1', 'final', 'COMPLETED', '{now}', '{now}', '{now}')",
    ]
    urls = {
        "sub_1": "https://Hooks.Example.com/a?x=1",
        "sub_2": "http://93.184.216.34:8080/b",
        "sub_3": "https://done.example.com/c",
    }
    for sub_id, url in urls.items():
        statements.append(
            "INSERT INTO subscriptions (id, api_key_id, generation_id, callback_url, status,"
            f" attempts, created_at, updated_at) VALUES ('{sub_id}', 'key_1', 'gen_1', '{url}',"
            f" 'active', 0, '{now}', '{now}')"
        )
    for number, (sub_id, status) in enumerate(
        [("sub_1", "pending"), ("sub_2", "pending"), ("sub_3", "delivered")], start=1
    ):
        statements.append(
            "INSERT INTO deliveries (id, subscription_id, webhook_id, event, status, attempts,"
            f" next_attempt_at, created_at, updated_at) VALUES ({number}, '{sub_id}',"
            f" 'msg_{number}', 'generation.completed', '{status}', 0, '{now}', '{now}', '{now}')"
        )
    sync_execute(empty_url, statements)

    migrate.upgrade(empty_url, secret_key=TEST_SECRET_KEY)
    assert "ix_deliveries_host_due" in index_names(empty_url, "deliveries")
    hosts = sync_rows(empty_url, "SELECT id, host FROM deliveries ORDER BY id")
    assert hosts == [(1, "hooks.example.com:443"), (2, "93.184.216.34:8080"), (3, None)]

    migrate.downgrade(empty_url, "0001", secret_key=TEST_SECRET_KEY)
    assert "ix_deliveries_host_due" not in index_names(empty_url, "deliveries")
    assert sync_count(empty_url, "SELECT count(*) FROM deliveries") == 3
    migrate.upgrade(empty_url, secret_key=TEST_SECRET_KEY)
    command.check(migrate.alembic_config(empty_url))


def test_0004_seals_the_signing_secrets_in_the_clear_and_opens_them_going_down(
    empty_url: str,
) -> None:
    """A database at 0002 with keys: upgrading seals each signing secret under the key
    (bound to its key id), downgrading opens them again; without a key it stops with one
    reason naming RELAY_SECRET_KEY and leaves the database at 0002."""
    migrate.upgrade(empty_url, "0002")
    now = "2026-11-28 12:00:00"
    secrets = {"key_1": "whsec_" + "A" * 43 + "=", "key_2": "whsec_" + "B" * 43 + "="}
    sync_execute(
        empty_url,
        [
            "INSERT INTO api_keys (id, name, key_hash, key_prefix, signing_secret, created_at)"
            f" VALUES ('{key_id}', 'k', 'h{key_id}', 'p', '{secret}', '{now}')"
            for key_id, secret in secrets.items()
        ],
    )
    with pytest.raises(SecretKeyError, match="RELAY_SECRET_KEY"):
        migrate.upgrade(empty_url)
    migrate.upgrade(empty_url, secret_key=TEST_SECRET_KEY)
    box = SecretBox(TEST_SECRET_KEY)
    rows = dict(sync_rows(empty_url, "SELECT id, signing_secret FROM api_keys ORDER BY id"))
    for key_id, secret in secrets.items():
        assert rows[key_id].startswith("v1:") and secret not in rows[key_id]
        assert box.open(rows[key_id], key_id) == secret
    with pytest.raises(SecretKeyError):
        box.open(rows["key_1"], "key_2")  # bound to its own key
    migrate.downgrade(empty_url, "0002", secret_key=TEST_SECRET_KEY)
    assert dict(sync_rows(empty_url, "SELECT id, signing_secret FROM api_keys")) == secrets
    migrate.upgrade(empty_url, secret_key=TEST_SECRET_KEY)
    command.check(migrate.alembic_config(empty_url))


def sync_execute(url: str, statements: list[str]) -> None:
    async def run() -> None:
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            async with engine.begin() as conn:
                for statement in statements:
                    await conn.execute(text(statement))
        finally:
            await engine.dispose()

    asyncio.run(run())


def sync_rows(url: str, query: str) -> list[tuple[Any, ...]]:
    async def run() -> list[tuple[Any, ...]]:
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                return [tuple(row) for row in await conn.execute(text(query))]
        finally:
            await engine.dispose()

    return asyncio.run(run())


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
