"""Shared fixtures: real databases (SQLite files and PostgreSQL), real servers on loopback.

Every storage-dependent test takes `db_url`, parametrised over SQLite and PostgreSQL. The
PostgreSQL URL comes from RELAY_TEST_PG_URL (default: the local server's `postgres` user);
when PostgreSQL is unreachable those tests are skipped, and `.ci/run` fails the build if any
was (RELAY_REQUIRE_PG=1 turns a skip into a failure here too). The helpers these fixtures are
built from, and that tests import, are in tests/helpers.py.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from relay import migrate
from relay.database import Database
from relay.simulator import FakeUpstream, FakeUpstreamConfig, create_fake_upstream
from tests.helpers import (
    PG_AVAILABLE,
    UPSTREAM_KEY,
    Receiver,
    create_pg_database,
    drop_pg_database,
    empty_pg_tables,
    open_test_database,
    serve_in_thread,
    serve_receiver,
)


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
    empty_pg_tables(pg_template_url)
    return pg_template_url


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = open_test_database(db_url)
    await database.sync_clock()
    yield database
    await database.dispose()


@pytest.fixture
def fake_upstream() -> Iterator[tuple[FakeUpstream, str]]:
    """The upstream simulator on a real socket: (its state, its base URL)."""
    app = create_fake_upstream(FakeUpstreamConfig(api_key=UPSTREAM_KEY, seed=7, time_scale=1.0))
    sim: FakeUpstream = app.state.fake_upstream
    with serve_in_thread(app) as url:
        yield sim, url


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A callback receiver on a real socket; `receiver.responses[path]` scripts its answers."""
    with serve_receiver() as state:
        yield state
