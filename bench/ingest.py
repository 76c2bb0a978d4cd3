"""Ingest: subscriptions created per second through the API, with p50/p99 latency.

One relay process (`--role api`: the worker is measured elsewhere) with validation, key
checks and the private-address rule on (callback URLs are public literal IPs, so the rule runs
without DNS), 8 client keys under the default per-key rate limit. The load comes from wrk
(`apt-get install wrk`; bench/ingest.lua makes each request unique), as in the baseline
figures of the measurements this project started from; without wrk, bench/loadgen.py
(aiohttp, in another process) is used and the table says so. Python as a load generator
takes a third of a core from the relay on this 2-core machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from bench.common import Results, drop_database, metrics_env, new_database, scraping
from bench.harness import ROOT, cluster, create_key

CONCURRENCIES = (32, 64, 128)


def _wrk(url: str, keys: list[str], concurrency: int, duration_s: int) -> dict[str, float]:
    env = {**os.environ, "KEYS": ",".join(keys), "TAG": uuid.uuid4().hex[:8]}
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{duration_s}s",
            "-s",
            str(ROOT / "bench" / "ingest.lua"),
            url,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=duration_s + 60,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    ok = figures["requests"] - figures["non2xx"] - figures["socket_errors"]
    return {
        "rate": ok / figures["seconds"],
        "p50_ms": figures["p50_ms"],
        "p99_ms": figures["p99_ms"],
        "errors": figures["non2xx"] + figures["socket_errors"],
    }


def _loadgen(url: str, keys: list[str], concurrency: int, duration_s: int) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.loadgen",
            f"{url}/v1/subscriptions",
            ",".join(keys),
            str(concurrency),
            str(duration_s),
            uuid.uuid4().hex[:8],
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        timeout=duration_s + 120,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    errors = sum(v for k, v in figures["statuses"].items() if k != "201")
    return {
        "rate": figures["rate"],
        "p50_ms": figures["p50_ms"],
        "p99_ms": figures["p99_ms"],
        "errors": errors,
    }


def run(results: Results, database: str, workdir: Path, quick: bool, metrics: bool = False) -> None:
    duration_s = 3 if quick else 10
    concurrencies = CONCURRENCIES[:2] if quick else CONCURRENCIES
    driver = _wrk if shutil.which("wrk") else _loadgen
    tool = "wrk" if driver is _wrk else "aiohttp loadgen"

    def load(url: str, keys: list[str]) -> dict[int, dict[str, float]]:
        return {c: driver(url, keys, c, duration_s) for c in concurrencies}

    relay = _relay_figures(database, workdir, load)
    with_metrics = _relay_figures(database, workdir, load, metrics=True) if metrics else {}
    bare = _bare_figures(database, workdir, load)
    for concurrency in concurrencies:
        figures = relay[concurrency]
        results.add(
            "ingest",
            database,
            f"subscriptions/s (c={concurrency})",
            f"{figures['rate']:.0f}",
            _noted(f"{tool}, {concurrency} connections, {duration_s} s", figures),
        )
        results.add(
            "ingest",
            database,
            f"latency p50 / p99 ms (c={concurrency})",
            f"{figures['p50_ms']:.1f} / {figures['p99_ms']:.1f}",
        )
    for concurrency, figures in with_metrics.items():
        results.add(
            "ingest",
            database,
            f"subscriptions/s (c={concurrency}, metrics on)",
            f"{figures['rate']:.0f}",
            _noted("RELAY_ADMIN_TOKEN set, /metrics scraped every second", figures),
        )
        if relay[concurrency]["rate"]:
            ratio = figures["rate"] / relay[concurrency]["rate"]
            results.add("ingest", database, f"metrics on / off (c={concurrency})", f"{ratio:.0%}")
    for concurrency in concurrencies:
        results.add(
            "ingest",
            database,
            f"bare handler requests/s (c={concurrency})",
            f"{bare[concurrency]['rate']:.0f}",
            _noted("one insert per request, no checks", bare[concurrency]),
        )
    for concurrency in concurrencies:
        if bare[concurrency]["rate"]:
            ratio = relay[concurrency]["rate"] / bare[concurrency]["rate"]
            results.add(
                "ingest", database, f"relay / bare handler (c={concurrency})", f"{ratio:.2f}x"
            )


def _noted(note: str, figures: dict[str, float]) -> str:
    return f"{note}, {figures['errors']:.0f} errors" if figures["errors"] else note


Load = Callable[[str, list[str]], dict[int, dict[str, float]]]


def _relay_figures(
    database: str, workdir: Path, load: Load, metrics: bool = False
) -> dict[int, dict[str, float]]:
    """One `relay serve --role api` on a new database, 8 client keys; with `metrics`, metrics
    on and scraped every second."""
    url = new_database(database, workdir)
    try:
        keys = [create_key(url, f"ingest-{i}")["api_key"] for i in range(8)]
        with cluster(workdir / f"ingest-{database}-{'metrics' if metrics else 'plain'}") as c:
            env = {"RELAY_DATABASE_URL": url, "RELAY_LOG_LEVEL": "WARNING", **metrics_env(metrics)}
            node = c.relay("relay", env, role="api").start()
            with scraping(node.url if metrics else None):
                return load(node.url, keys)
    finally:
        drop_database(url)


def _bare_figures(database: str, workdir: Path, load: Load) -> dict[int, dict[str, float]]:
    """The same load on the bare one-insert-per-request handler, on its own new database."""
    url = new_database(database, workdir)
    try:
        with cluster(workdir / f"ingest-bare-{database}") as c:
            return load(c.bare_ingest(url).url, ["unused"])
    finally:
        drop_database(url)
