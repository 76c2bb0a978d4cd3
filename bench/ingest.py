"""Ingest: subscriptions created per second through the API, with p50/p99 latency.

One relay process (`--role api`: the worker is measured elsewhere) with validation, key
checks and the private-address rule on (callback URLs are public literal IPs, so the rule runs
without DNS), 8 client keys under the default per-key rate limit, and a load generator
(bench/loadgen.py, aiohttp) in another process, at several client concurrencies.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

from bench.common import Results, drop_database, new_database
from bench.harness import ROOT, cluster, create_key

CONCURRENCIES = (16, 64, 256)


def run(results: Results, database: str, workdir: Path, quick: bool) -> None:
    url = new_database(database, workdir)
    try:
        keys = [create_key(url, f"ingest-{i}")["api_key"] for i in range(8)]
        duration_s = 3 if quick else 10
        with cluster(workdir / f"ingest-{database}") as c:
            node = c.relay(
                "relay", {"RELAY_DATABASE_URL": url, "RELAY_LOG_LEVEL": "WARNING"}, role="api"
            ).start()
            for concurrency in CONCURRENCIES[:2] if quick else CONCURRENCIES:
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "bench.loadgen",
                        f"{node.url}/v1/subscriptions",
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
                other = {k: v for k, v in figures["statuses"].items() if k != "201"}
                note = f"{concurrency} in flight, {duration_s} s" + (
                    f", other answers {other}" if other else ""
                )
                results.add(
                    "ingest",
                    database,
                    f"subscriptions/s (c={concurrency})",
                    f"{figures['rate']:.0f}",
                    note,
                )
                results.add(
                    "ingest",
                    database,
                    f"latency p50 / p99 ms (c={concurrency})",
                    f"{figures['p50_ms']:.1f} / {figures['p99_ms']:.1f}",
                )
    finally:
        drop_database(url)
