"""Outages in the logs: a few lines, never a flood of tracebacks; a bug's traceback once.

The outage test stops a private PostgreSQL cluster (tests/private_pg.py) for 8 seconds under a
small load against `relay serve` as a real process, and reads what it logged, line by line
(JSON). The tracker, the classifier and the once-per-kind tracebacks are also checked alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from relay import migrate
from relay.health import UpstreamHealth
from relay.outages import Outage, is_outage, reason, report_failure
from relay.simulator import FakeUpstream
from relay.upstream import PollResult
from tests.delivery import pending_generation, subscribe
from tests.helpers import Receiver, new_key, relay_process, serve_env, wait_for
from tests.private_pg import private_postgres

# --- The tracker on its own ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_outage_is_one_line_a_reminder_a_minute_and_one_line_at_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Down: one warning saying what relay does; a reminder at most every 60 s; back: one line
    with how long it lasted and what waited."""
    clock = Clock()
    outage = Outage("the database", "callbacks wait", event="database", clock=clock)
    with caplog.at_level(logging.INFO, logger="relay.outages"):
        for second in range(150):
            clock.now = 1000.0 + second
            outage.failed("ConnectionRefusedError: refused", "API requests answered 503")
            outage.failed("ConnectionRefusedError: refused", "polls")
        clock.now = 1150.5
        outage.recovered()
        outage.recovered()
    lines = [record.getMessage() for record in caplog.records]
    events = [record.event for record in caplog.records]  # type: ignore[attr-defined]
    assert events == ["database.down", "database.still_down", "database.still_down", "database.up"]
    assert lines[0] == (
        "the database is unreachable (ConnectionRefusedError: refused); meanwhile callbacks wait"
    )
    assert "still so after 60 s" in lines[1] and "still so after 120 s" in lines[2]
    assert lines[3] == (
        "the database is reachable again after 150.5 s; meanwhile 300 operations failed "
        "(150 API requests answered 503, 150 polls)"
    )


def test_a_threshold_ignores_a_single_failure(caplog: pytest.LogCaptureFixture) -> None:
    """With a threshold of 3, failures fewer than 3 in a row log nothing."""
    outage = Outage("the upstream", "polls back off", event="upstream", threshold=3)
    with caplog.at_level(logging.INFO, logger="relay.outages"):
        for _ in range(5):
            outage.failed("HTTP 502")
            outage.failed("HTTP 502")
            outage.recovered()
    assert caplog.records == []


def test_upstream_outages_and_a_refused_key_are_a_line_each_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three failed polls in a row start an upstream outage, a good poll ends it; a refused
    key is its own outage, named for what the operator must fix."""
    health = UpstreamHealth()
    error = PollResult(kind="error", error="upstream answered HTTP 502")
    refused = PollResult(kind="unauthorized", error="upstream answered HTTP 401")
    ok = PollResult(kind="ok", status="IN_PROGRESS", body="{}")
    with caplog.at_level(logging.INFO, logger="relay.outages"):
        for result in [error, error, ok, *[error] * 10, ok, refused, refused, ok]:
            health.observe(result)
    events = [record.event for record in caplog.records]  # type: ignore[attr-defined]
    assert events == ["upstream.down", "upstream.up", "upstream_key.down", "upstream_key.up"]
    assert "RELAY_UPSTREAM_API_KEY" in caplog.records[2].getMessage()
    assert health.state == "ok"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ConnectionRefusedError(111, "Connect call failed"), True),
        (OperationalError("SELECT 1", {}, Exception("server closed the connection")), True),
        (IntegrityError("INSERT", {}, Exception("duplicate key")), False),
        (ValueError("a bug"), False),
        (KeyError("x"), False),
    ],
)
def test_outages_are_told_from_bugs(error: Exception, expected: bool) -> None:
    """Unreachable databases and networks are outages; integrity errors and bugs are not."""
    assert is_outage(error) is expected


def test_a_bug_logs_its_traceback_once_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    """An error relay does not understand logs a traceback the first time; the same kind again
    within a minute logs nothing more."""
    log = logging.getLogger("relay.test_outages")

    def fail(value: int) -> None:
        raise ValueError(f"bad value {value}")

    with caplog.at_level(logging.INFO):
        for value in range(5):
            try:
                fail(value)
            except ValueError as exc:
                report_failure(log, exc, None, "polls", "poll of %s failed", f"gen_{value}")
        with contextlib.suppress(KeyError):
            try:
                raise KeyError("other kind")
            except KeyError as exc:
                report_failure(log, exc, None, "polls", "poll of %s failed", "gen_x")
    assert [r.getMessage() for r in caplog.records] == [
        "poll of gen_0 failed",
        "poll of gen_x failed",
    ]
    assert all(record.exc_info for record in caplog.records)


def test_the_reason_is_the_innermost_error_on_one_line() -> None:
    """An outage is described by its root cause, one line, short."""
    try:
        try:
            raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5)")
        except OSError as inner:
            raise OperationalError("SELECT 1\nFROM x", {}, inner) from inner
    except OperationalError as exc:
        assert (
            reason(exc)
            == "ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 5)"
        )


# --- Stopping PostgreSQL for 8 seconds under load ------------------------------------------------


async def _api_load(client: httpx.AsyncClient, sub_id: str, statuses: list[int]) -> None:
    """Reads and creates, about 20 requests a second, until cancelled."""
    n = 0
    while True:
        n += 1
        read = await client.get(f"/v1/subscriptions/{sub_id}")
        created = await client.post(
            "/v1/subscriptions",
            json={"generation_id": f"gen_load_{n}", "callback_url": "http://127.0.0.1:9/x"},
        )
        statuses += [read.status_code, created.status_code]
        await asyncio.sleep(0.1)


def _records(log_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


@pytest.mark.timeout(240)
async def test_an_8_second_postgresql_stop_under_load_is_a_few_lines(
    fake_upstream: tuple[FakeUpstream, str], receiver: Receiver, tmp_path: Path
) -> None:
    """Stopping PostgreSQL for 8 s while 60 subscriptions are polled and delivered and the API
    is in use writes a few dozen lines at most, no traceback: one warning when it starts, one
    line when it ends; the API answers 503 meanwhile, and every callback arrives afterwards."""
    sim, upstream_url = fake_upstream
    log_path = tmp_path / "relay.log"
    with private_postgres() as pg:
        await asyncio.to_thread(migrate.upgrade, pg.url)
        key = await new_key(pg.url)
        env = serve_env(pg.url, upstream_url, RELAY_LOG_FORMAT="json", RELAY_LEASE="5")
        gens = [pending_generation(sim, f"gen_outage_{i}") for i in range(60)]
        auth = {"authorization": f"Bearer {key.api_key}"}
        async with (
            relay_process(env, log_path) as (_, base_url),
            httpx.AsyncClient(base_url=base_url, headers=auth, timeout=10) as client,
        ):
            subs = [await subscribe(client, g.id, f"{receiver.url}/hook/{g.id}") for g in gens]
            for gen in gens[:20]:
                sim.finish(gen.id)
            await wait_for(lambda: len(receiver.received) >= 20, timeout_s=20)
            statuses: list[int] = []
            load = asyncio.create_task(_api_load(client, subs[0]["id"], statuses))
            await asyncio.sleep(1)
            lines_before = len(log_path.read_text().splitlines())
            stopped_at = time.monotonic()
            await asyncio.to_thread(pg.stop)
            for gen in gens[20:40]:
                sim.finish(gen.id)  # final while the database is down
            await asyncio.sleep(8 - (time.monotonic() - stopped_at))
            await asyncio.to_thread(pg.start)
            lines_while_down = len(log_path.read_text().splitlines()) - lines_before
            for gen in gens[40:]:
                sim.finish(gen.id)
            await wait_for(lambda: len({r.path for r in receiver.received}) >= 60, timeout_s=60)
            load.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await load

    text = log_path.read_text()
    assert "Traceback" not in text
    records = _records(log_path)
    # From the stop on, every line but the business of the 40 generations that end then.
    business = ("generation.ended", "callback.retry", "callback.fail")
    since_stop = [r for r in records[lines_before:] if r["event"] not in business]
    loud = [r for r in records if r["level"] in ("WARNING", "ERROR", "CRITICAL")]
    summary = "\n".join(f"{r['level']} {r['event']}: {r['message']}" for r in since_stop)
    assert lines_while_down <= 5, summary
    assert len(since_stop) <= 12, summary
    assert len(loud) <= 4, summary
    events = [r["event"] for r in loud]
    assert events.count("database.down") == 1, summary
    assert events.count("database.up") == 1, summary
    (up,) = [r for r in loud if r["event"] == "database.up"]
    assert up["down_s"] >= 7, up
    assert up["waited"].get("API requests answered 503", 0) > 0, up
    # The API said 503 while it was down, and nothing was lost.
    assert 503 in statuses and 201 in statuses
    assert len({r.path for r in receiver.received}) == 60
