"""Engines and the database clock: how the relay connects, on SQLite and on PostgreSQL.

SQLite is the single-process default, set up for it: WAL, a busy timeout, `synchronous=NORMAL`
(durable across process crashes; WAL makes it safe), foreign keys on, and one writer connection
whose transactions begin IMMEDIATE so claims never fail half-way on an upgraded lock. PostgreSQL
uses one pool for reads and writes.

Time comes from the database clock: the offset between this machine and the database is
measured at start and refreshed by the worker, so every node stamps leases on one clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from relay.errors import StartupError
from relay.outages import Outage, is_outage, reason
from relay.secretbox import SecretBox, SecretKeyError

# What relay does while the database is down, said once when an outage starts.
DATABASE_MEANWHILE = (
    "the API answers 503 unavailable, /readyz 503, and polls and callbacks wait in the "
    "database's tables: nothing is lost, and what fell due is picked up when it is back"
)


def database_outage() -> Outage:
    return Outage("the database", DATABASE_MEANWHILE, event="database")


@dataclass
class Database:
    """The engines the relay talks through, and the clock it stamps times with."""

    url: str
    read: AsyncEngine
    write: AsyncEngine
    clock_offset: timedelta = field(default=timedelta(0))
    # Every unit of work reports here: an outage is a few log lines (outages.py).
    outage: Outage = field(default_factory=database_outage)
    # Seals and opens signing secrets; None where no RELAY_SECRET_KEY was given.
    box: SecretBox | None = None

    @property
    def secrets(self) -> SecretBox:
        """The secret box, or SecretKeyError if this process has no RELAY_SECRET_KEY."""
        if self.box is None:
            raise SecretKeyError("RELAY_SECRET_KEY is not set: signing secrets cannot be read")
        return self.box

    @property
    def is_postgres(self) -> bool:
        return self.write.dialect.name == "postgresql"

    def now(self) -> datetime:
        """The database's idea of now, as an aware UTC datetime."""
        return datetime.now(UTC) + self.clock_offset

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction (IMMEDIATE on SQLite)."""
        async with self._watched(), self.write.begin() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def reader(self) -> AsyncIterator[AsyncConnection]:
        """A read-only unit of work."""
        async with self._watched(), self.read.connect() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _watched(self) -> AsyncIterator[None]:
        """Tell the outage tracker whether this unit of work reached the database."""
        try:
            yield
        except Exception as exc:
            if is_outage(exc):
                self.outage.failed(reason(exc))
            raise
        self.outage.recovered()

    async def sync_clock(self) -> None:
        """Measure this machine's offset from the database clock (PostgreSQL only)."""
        if not self.is_postgres:
            return
        async with self.reader() as conn:
            before = datetime.now(UTC)
            db_now = (await conn.execute(text("SELECT clock_timestamp()"))).scalar_one()
            after = datetime.now(UTC)
        self.clock_offset = db_now - (before + (after - before) / 2)

    async def ping(self, timeout_s: float = 2.0) -> bool:
        """Whether the database answers within `timeout_s` (readiness must not hang)."""
        try:
            async with asyncio.timeout(timeout_s), self.reader() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            if isinstance(exc, TimeoutError):  # a hang is an outage too
                self.outage.failed(f"no answer within {timeout_s:g} s")
            return False
        return True

    async def dispose(self) -> None:
        await self.write.dispose()
        if self.read is not self.write:
            await self.read.dispose()


def open_database(url: str, *, pool_size: int = 10, secret_key: str | None = None) -> Database:
    """Create the engines for `url` (no I/O until first use); `secret_key` seals and opens
    the signing secrets stored there."""
    box = SecretBox(secret_key) if secret_key is not None else None
    if url.startswith("sqlite"):
        # hide_parameters: a failing statement's log line must not carry callback URLs,
        # metadata or key hashes.
        write = create_async_engine(
            url, pool_size=1, max_overflow=0, pool_timeout=60, hide_parameters=True
        )
        read = create_async_engine(
            url, pool_size=4, max_overflow=0, pool_timeout=60, hide_parameters=True
        )
        _configure_sqlite(write, immediate=True)
        _configure_sqlite(read, immediate=False)
        return Database(url=url, read=read, write=write, box=box)
    engine = create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=1800,
        hide_parameters=True,
        # asyncpg prepares every statement once per connection, and after five runs
        # PostgreSQL may switch a prepared statement to a generic plan made without its
        # parameters' values. For the relay's tables, which go from empty to a backlog of
        # 100,000 rows and back, such a plan can be far off (the create batch slowed down
        # markedly on one: docs/benchmarks.md). Planning with the values costs under 1 ms.
        connect_args={"server_settings": {"plan_cache_mode": "force_custom_plan"}},
    )
    return Database(url=url, read=engine, write=engine, box=box)


def _configure_sqlite(engine: AsyncEngine, *, immediate: bool) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the driver so the "begin" hook below decides its kind.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def sqlite_path(url: str) -> str | None:
    """The file behind a SQLite URL (symlinks resolved), or None for PostgreSQL and
    in-memory databases."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite"):
        return None
    database = parsed.database
    if not database or database == ":memory:":
        return None
    return os.path.realpath(database)


def hold_sqlite_serve_lock(url: str) -> IO[str] | None:
    """Refuse a second `relay serve` on one SQLite file: hold an exclusive lock while serving.

    The lock file sits beside the database (its real path, so a symlink does not get past
    it) and is released by the kernel when the process dies, `kill -9` included.
    """
    path = sqlite_path(url)
    if path is None:
        return None
    try:
        lock_file = open(path + ".serve-lock", "a+")  # noqa: SIM115 (held for the process lifetime)
    except OSError as exc:
        raise StartupError(f"cannot open the SQLite database at {path}: {exc.strerror}") from None
    try:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        raise StartupError(
            f"another relay serve is already running on {path}; SQLite is single-process "
            "(use PostgreSQL to run several)"
        ) from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    return lock_file
