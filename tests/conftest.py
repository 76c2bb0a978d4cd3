"""Shared fixtures: real databases (SQLite files and PostgreSQL), real servers on loopback.

Every storage-dependent test takes `db_url`, parametrised over SQLite and PostgreSQL. The
PostgreSQL URL comes from RELAY_TEST_PG_URL (default: the local server's `postgres` user);
when PostgreSQL is unreachable those tests are skipped, and `.ci/run` fails the build if any
was (RELAY_REQUIRE_PG=1 turns a skip into a failure here too).
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.common import pg_admin
from relay import migrate, store
from relay.config import Settings
from relay.database import Database, open_database
from relay.simulator import FakeUpstream, FakeUpstreamConfig, create_fake_upstream
from tests.servers import serve_in_thread

PG_ADMIN_URL = os.environ.get("RELAY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
UPSTREAM_KEY = "upstream-test-key"


def _pg_available() -> bool:
    host_port = PG_ADMIN_URL.split("@", 1)[1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    try:
        with socket.create_connection((host, int(port or 5432)), timeout=1):
            return True
    except OSError:
        return False


PG_AVAILABLE = _pg_available()


def _async_pg_url(database: str) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{database}".replace("postgresql://", "postgresql+asyncpg://", 1)


def create_pg_database() -> str:
    """A new empty PostgreSQL database; returns its async URL."""
    name = f"relay_test_{uuid.uuid4().hex[:12]}"
    pg_admin(f'CREATE DATABASE "{name}"', PG_ADMIN_URL)
    return _async_pg_url(name)


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', PG_ADMIN_URL)


@pytest.fixture(scope="session")
def pg_template_url() -> Iterator[str | None]:
    """One migrated PostgreSQL database for the session; tests empty its tables."""
    if not PG_AVAILABLE:
        yield None
        return
    url = create_pg_database()
    migrate.upgrade(url)
    yield url
    drop_pg_database(url)


def _empty_pg(url: str) -> None:
    async def run() -> None:
        import asyncpg

        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
        try:
            await conn.execute(
                "TRUNCATE delivery_attempts, deliveries, subscriptions, generations, api_keys"
            )
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Any, pg_template_url: str | None) -> str:
    """A migrated, empty database: a SQLite file or the session's PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/relay.db"
        migrate.upgrade(url)
        return url
    if pg_template_url is None:
        if os.environ.get("RELAY_REQUIRE_PG") == "1":
            pytest.fail("PostgreSQL is required (RELAY_REQUIRE_PG=1) but not reachable")
        pytest.skip("PostgreSQL is not reachable")
    _empty_pg(pg_template_url)
    return pg_template_url


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = open_database(db_url)
    await database.sync_clock()
    yield database
    await database.dispose()


def fast_settings(
    db_url: str, upstream_url: str = "http://127.0.0.1:9", **changes: Any
) -> Settings:
    """Settings for tests: short intervals, private callbacks allowed, the simulator upstream."""
    base = Settings(
        database_url=db_url,
        upstream_url=upstream_url,
        upstream_api_key=UPSTREAM_KEY,
        upstream_timeout_s=2.0,
        upstream_max_rps=1000.0,
        poll_min_interval_s=0.05,
        poll_max_interval_s=0.5,
        delivery_timeout_s=2.0,
        delivery_retry_schedule_s=(0.1, 0.2, 0.3),
        allow_private_callbacks=True,
        lease_s=3.0,
    )
    return base.with_(**changes)


@pytest.fixture
def fake_upstream() -> Iterator[tuple[FakeUpstream, str]]:
    """The upstream simulator on a real socket: (its state, its base URL)."""
    app = create_fake_upstream(FakeUpstreamConfig(api_key=UPSTREAM_KEY, seed=7, time_scale=1.0))
    sim: FakeUpstream = app.state.fake_upstream
    with serve_in_thread(app) as url:
        yield sim, url


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """A callback receiver on a real socket; `responses[path]` scripts its answers."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    responses: dict[str, list[tuple[int, dict[str, str], float]]] = field(default_factory=dict)

    def on(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    import time

    state = Receiver()

    async def hook(request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        state.received.append(Received(path, dict(request.headers), body, time.time()))
        script = state.responses.get(path)
        headers: dict[str, str] = {}
        status, delay_s = 200, 0.0
        if script:
            status, headers, delay_s = script.pop(0) if len(script) > 1 else script[0]
        if delay_s:
            await asyncio.sleep(delay_s)
        return Response(b"ok", status_code=status, headers=headers)

    app = Starlette(routes=[Route("/{path:path}", hook, methods=["POST"])])
    with serve_in_thread(app) as url:
        state.url = url
        yield state


async def new_key(database_url: str, name: str = "test") -> store.NewKey:
    database = open_database(database_url)
    try:
        return await store.create_key(database, name)
    finally:
        await database.dispose()


def constant(value: float) -> Callable[[], float]:
    """A stand-in for random.random that always draws `value`."""
    return lambda: value


async def wait_for(predicate: Any, timeout_s: float = 10.0, interval_s: float = 0.05) -> Any:
    """Poll `predicate` (sync or async) until truthy; fail the test at the deadline."""
    async with asyncio.timeout(timeout_s):
        while True:
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(interval_s)


def pg_url_for_new_database() -> str:
    if not PG_AVAILABLE:
        pytest.skip("PostgreSQL is not reachable")
    return create_pg_database()


def sync_count(url: str, sql: str) -> int:
    """Run a counting query from synchronous test code (subprocess tests)."""

    async def run() -> int:
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                return int((await conn.execute(text(sql))).scalar_one())
        finally:
            await engine.dispose()

    return asyncio.run(run())
