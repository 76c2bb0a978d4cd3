"""Helpers shared by the tests: databases, real servers and processes on loopback, waits.

Fixtures live in conftest.py and are built from these. Nothing here imports `bench/`: the
tests stand on their own. Databases: SQLite files and PostgreSQL databases made per test or
per session (RELAY_TEST_PG_URL names the admin connection, default the local `postgres` user).
Servers: any ASGI app under uvicorn in a thread on port 0, a scripted callback receiver, and
real processes (`relay serve`, the simulator) started and stopped under deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay import store
from relay.config import Settings
from relay.database import Database, open_database
from relay.models import metadata

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("RELAY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
UPSTREAM_KEY = "upstream-test-key"
# RELAY_SECRET_KEY of the tests' relays and databases (never a real one).
TEST_SECRET_KEY = "test-secret-key-0123456789-abcdefghijklmnop"

# --- Databases ----------------------------------------------------------------------------------


def _pg_available() -> bool:
    host_port = PG_ADMIN_URL.split("@", 1)[1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    try:
        with socket.create_connection((host, int(port or 5432)), timeout=1):
            return True
    except OSError:
        return False


PG_AVAILABLE = _pg_available()


def pg_admin(sql: str) -> None:
    """Run one statement (CREATE/DROP DATABASE) on the PostgreSQL admin connection."""

    async def run() -> None:
        import asyncpg

        conn = await asyncpg.connect(PG_ADMIN_URL)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def _async_pg_url(database: str) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{database}".replace("postgresql://", "postgresql+asyncpg://", 1)


def create_pg_database() -> str:
    """A new empty PostgreSQL database; returns its async URL."""
    name = f"relay_test_{uuid.uuid4().hex[:12]}"
    pg_admin(f'CREATE DATABASE "{name}"')
    return _async_pg_url(name)


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_url_for_new_database() -> str:
    if not PG_AVAILABLE:
        pytest.skip("PostgreSQL is not reachable")
    return create_pg_database()


def empty_pg_tables(url: str) -> None:
    """Delete every row of the relay's tables in a migrated PostgreSQL database."""

    async def run() -> None:
        import asyncpg

        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
        try:
            await conn.execute(f"TRUNCATE {', '.join(metadata.tables)}")
        finally:
            await conn.close()

    asyncio.run(run())


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


def open_test_database(url: str) -> Database:
    """A Database for `url` that seals and opens secrets under TEST_SECRET_KEY."""
    return open_database(url, secret_key=TEST_SECRET_KEY)


async def new_key(database_url: str, name: str = "test") -> store.NewKey:
    database = open_test_database(database_url)
    try:
        return await store.create_key(database, name)
    finally:
        await database.dispose()


def fast_settings(
    db_url: str, upstream_url: str = "http://127.0.0.1:9", **changes: Any
) -> Settings:
    """Settings for tests: short intervals, private callbacks allowed, the simulator upstream."""
    base = Settings(
        database_url=db_url,
        upstream_url=upstream_url,
        upstream_api_key=UPSTREAM_KEY,
        secret_key=TEST_SECRET_KEY,
        upstream_timeout_s=2.0,
        upstream_max_rps=1000.0,
        poll_min_interval_s=0.05,
        poll_max_interval_s=0.5,
        delivery_timeout_s=2.0,
        delivery_retry_schedule_s=(0.1, 0.2, 0.3),
        allow_private_callbacks=True,
        lease_s=3.0,
    )
    return dataclasses.replace(base, **changes)


# --- Waiting and randomness ---------------------------------------------------------------------


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


# --- Servers in threads -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _ThreadedServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the main thread owns signals
        pass


@contextlib.contextmanager
def serve_in_thread(
    app: Any, host: str = "127.0.0.1", startup_timeout_s: float = 10.0
) -> Iterator[str]:
    """Run `app` under uvicorn on a free port; yield its base URL (no trailing slash)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = _ThreadedServer(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


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


@contextlib.contextmanager
def serve_receiver(bodies: dict[str, bytes] | None = None) -> Iterator[Receiver]:
    """A Receiver on its own port: records every POST, answers as `responses[path]` scripts
    (status, headers, delay; the last entry repeats), else 200, with `bodies[path]` or "ok"."""
    state = Receiver()
    answer_bodies = bodies or {}

    async def hook(request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        state.received.append(Received(path, dict(request.headers), body, time.time()))
        script = state.responses.get(path)
        answer: tuple[int, dict[str, str], float] = (200, {}, 0.0)
        if script:
            answer = script.pop(0) if len(script) > 1 else script[0]
        status, headers, delay_s = answer
        if delay_s:
            await asyncio.sleep(delay_s)
        return Response(answer_bodies.get(path, b"ok"), status_code=status, headers=headers)

    app = Starlette(routes=[Route("/{path:path}", hook, methods=["POST"])])
    with serve_in_thread(app) as url:
        state.url = url
        yield state


# --- Real processes -----------------------------------------------------------------------------


def log_tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-3000:]


@contextlib.asynccontextmanager
async def process(
    args: list[str],
    env: dict[str, str],
    log_path: Path,
    ready_url: str,
    startup_timeout_s: float = 20.0,
    cwd: Path | None = None,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`args` as a real process (its output appended to `log_path`, `env` over the caller's);
    yields it once `ready_url` answers 200, and stops it on exit (SIGTERM, then SIGKILL)
    unless the test ended it."""
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            *args,
            env={**os.environ, "RELAY_SECRET_KEY": TEST_SECRET_KEY, **env},
            stdout=log,
            stderr=log,
            cwd=cwd,
        )
    try:
        async with asyncio.timeout(startup_timeout_s), httpx.AsyncClient(timeout=1) as probe:
            while True:
                assert proc.returncode is None, log_tail(log_path)
                with contextlib.suppress(httpx.TransportError):
                    if (await probe.get(ready_url)).status_code == 200:
                        break
                await asyncio.sleep(0.1)
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


@contextlib.asynccontextmanager
async def relay_process(
    env: dict[str, str], log_path: Path, startup_timeout_s: float = 20.0
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`relay serve` as a real process (its output appended to `log_path`); yields it and its
    base URL once /healthz answers, and stops it on exit unless the test killed it."""
    port = free_port()
    args = [sys.executable, "-m", "relay.cli", "serve", "--port", str(port)]
    base_url = f"http://127.0.0.1:{port}"
    async with process(args, env, log_path, f"{base_url}/healthz", startup_timeout_s) as proc:
        yield proc, base_url


# --- The operator's side ------------------------------------------------------------------------

ADMIN_TOKEN = "admin-token-for-tests-0123456789"


def admin_headers(token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def queue_final_deliveries(
    db_url: str, key: store.NewKey, callback_urls: dict[str, str]
) -> None:
    """Generations already final (generation id → callback URL) with one subscription each
    of `key`: each has its delivery queued, pending until a worker sends it."""
    from relay.store import seeding

    database = open_database(db_url)
    try:
        await seeding.add_final_generations(
            database,
            {gen_id: f'{{"id": "{gen_id}", "status": "COMPLETED"}}' for gen_id in callback_urls},
        )
        key_hash = store.hash_api_key(key.api_key)
        await store.create_subscriptions(
            database,
            [
                store.CreateRequest(key_hash, gen_id, url, None)
                for gen_id, url in callback_urls.items()
            ],
        )
    finally:
        await database.dispose()


def serve_env(db_url: str, upstream_url: str, **variables: str) -> dict[str, str]:
    """The environment of a `relay serve` process for tests: fast polls and retries, private
    callbacks allowed, the simulator as upstream; `variables` added or changed."""
    return {
        "RELAY_DATABASE_URL": db_url,
        "RELAY_UPSTREAM_URL": upstream_url,
        "RELAY_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "RELAY_ALLOW_PRIVATE_CALLBACKS": "true",
        "RELAY_POLL_MIN_INTERVAL": "0.1",
        "RELAY_POLL_MAX_INTERVAL": "0.3",
        "RELAY_DELIVERY_RETRY_SCHEDULE": "0.2,0.5,1",
        **variables,
    }
