"""Helpers shared by the benchmark scenarios: databases, keys, the results table."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PG_ADMIN_URL = os.environ.get("RELAY_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# Signing secrets are sealed under RELAY_SECRET_KEY; every relay process and helper of a run
# shares this one (set before any of them starts), unless the caller chose another.
BENCH_SECRET_KEY = os.environ.setdefault(
    "RELAY_SECRET_KEY", "bench-secret-key-0123456789-abcdefghijklmnop"
)


@dataclass
class Row:
    scenario: str
    database: str
    metric: str
    value: str
    note: str = ""


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)

    def add(self, scenario: str, database: str, metric: str, value: str, note: str = "") -> None:
        row = Row(scenario, database, metric, value, note)
        self.rows.append(row)
        print(f"  {scenario:<12} {database:<10} {metric:<44} {value:>14}  {note}", flush=True)

    def markdown(self) -> str:
        lines = ["| scenario | database | metric | value | note |", "|---|---|---|---|---|"]
        lines += [
            f"| {r.scenario} | {r.database} | {r.metric} | {r.value} | {r.note} |"
            for r in self.rows
        ]
        return "\n".join(lines)


def new_database(kind: str, workdir: Path) -> str:
    """A new empty database of `kind` (sqlite or postgres), migrated; returns its URL."""
    if kind == "sqlite":
        path = workdir / f"bench-{uuid.uuid4().hex[:8]}.db"
        url = f"sqlite+aiosqlite:///{path}"
    else:
        name = f"relay_bench_{uuid.uuid4().hex[:10]}"
        pg_admin(f'CREATE DATABASE "{name}"')
        url = (
            PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
            + f"/{name}"
        )
    subprocess.run(
        [sys.executable, "-m", "relay.cli", "migrate"],
        env={**os.environ, "RELAY_DATABASE_URL": url, "RELAY_LOG_LEVEL": "WARNING"},
        check=True,
        capture_output=True,
    )
    return url


def drop_database(url: str) -> None:
    if url.startswith("postgresql"):
        name = url.rsplit("/", 1)[1]
        pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_admin(sql: str, admin_url: str = PG_ADMIN_URL) -> None:
    """Run one statement (CREATE/DROP DATABASE) on the PostgreSQL admin connection."""

    async def run() -> None:
        import asyncpg

        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {platform.system()} {platform.release()}"


# --- Metrics on or off (python -m bench.run --metrics) -------------------------------------------

METRICS_TOKEN = "bench-admin-token-0123456789abcdef"


def metrics_env(on: bool) -> dict[str, str]:
    """The environment that turns relay's metrics on (they are collected only with a token)."""
    return {"RELAY_ADMIN_TOKEN": METRICS_TOKEN} if on else {}


@contextlib.contextmanager
def scraping(base_url: str | None, every_s: float = 1.0) -> Iterator[None]:
    """Scrape `base_url`/metrics every `every_s` while the block runs, as a Prometheus server
    would (more often than its usual 15 s); None scrapes nothing (metrics off)."""
    if base_url is None:
        yield
        return
    import httpx

    stop = threading.Event()

    def scrape() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.wait(every_s):
                response = client.get(
                    f"{base_url}/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"}
                )
                response.raise_for_status()

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=15)
