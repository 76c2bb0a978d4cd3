"""Run relay's benchmarks and print one results table.

    python -m bench.run                       # every scenario on SQLite and PostgreSQL
    python -m bench.run --only ingest,delivery --db postgres
    python -m bench.run --quick               # a short smoke run of everything
    python -m bench.run --only ingest,delivery --metrics   # also with metrics on, and the ratio

Each scenario starts relay, the upstream simulator and callback receivers as separate
processes on loopback (bench/harness.py). The table is also written to
bench-results/<timestamp>.md with the machine it ran on.
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
import time
from pathlib import Path

from bench.common import Results, machine
from bench.harness import ROOT

SCENARIOS = ("ingest", "delivery", "e2e", "cost", "hints", "scale", "proxy")
METRICS_SCENARIOS = ("ingest", "delivery")  # the ones --metrics runs twice


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument("--db", default="sqlite,postgres")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="run ingest and delivery with metrics off and on (scraped every second)",
    )
    args = parser.parse_args()
    scenarios = [s.strip() for s in args.only.split(",") if s.strip()]
    databases = [d.strip() for d in args.db.split(",") if d.strip()]
    for name in scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    results = Results()
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        for name in scenarios:
            module = importlib.import_module(f"bench.{name}")
            for database in databases:
                print(f"== {name} on {database}", flush=True)
                started = time.monotonic()
                extra = {"metrics": True} if args.metrics and name in METRICS_SCENARIOS else {}
                module.run(results, database, Path(tmp), args.quick, **extra)
                print(f"   ({time.monotonic() - started:.0f} s)", flush=True)
    out_dir = ROOT / "bench-results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    command = f"python -m bench.run --only {','.join(scenarios)} --db {','.join(databases)}"
    command += " --quick" if args.quick else ""
    command += " --metrics" if args.metrics else ""
    text = f"# relay benchmark {stamp}\n\nmachine: {machine()}\n\ncommand: `{command}`\n\n{results.markdown()}\n"
    (out_dir / f"{stamp}.md").write_text(text)
    print()
    print(results.markdown())


if __name__ == "__main__":
    main()
