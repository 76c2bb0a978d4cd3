"""Logs: one JSON object per line with stable fields (uvicorn's access log included), and no
secret or callback query string in any line, in text or JSON.

The JSON test runs `relay serve` as a real process and parses every line it wrote; the
redaction rules are also checked on their own.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay import logs
from relay.simulator import FakeUpstream
from tests.delivery import final_generation, subscribe, wait_status
from tests.helpers import (
    ADMIN_TOKEN,
    UPSTREAM_KEY,
    Receiver,
    admin_headers,
    new_key,
    relay_process,
    serve_env,
)

STABLE_FIELDS = {"time", "level", "logger", "message", "event", "node"}
CALLBACK_SECRET = "query-secret-4f9a1c"


# --- Redaction -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "callback to https://app.example.com/hook?token=abc&x=1 failed",
            "callback to https://app.example.com/hook?[redacted] failed",
        ),
        (
            "postgresql+asyncpg://relay:s3cret@db:5432/relay",
            "postgresql+asyncpg://relay:[redacted]@db:5432/relay",
        ),
        ("Authorization: Bearer abc.def-123", "Authorization: Bearer [redacted]"),
        ("secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw=", "secret whsec_[redacted]"),
        ("key rk_AbCdEfGhIjKlMnOp_qrs-tu", "key rk_[redacted]"),
        ("the upstream key upstream-test-key leaked", "the upstream key [redacted] leaked"),
        (
            "plain words, http://host/path and 50% stay",
            "plain words, http://host/path and 50% stay",
        ),
    ],
)
def test_secrets_and_query_strings_are_redacted(text: str, expected: str) -> None:
    """URL query strings and passwords, bearer tokens, signing secrets, API keys and the
    configured secrets are replaced; other text is left alone."""
    assert logs.Redactor([UPSTREAM_KEY, None, "short"])(text) == expected


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """logs.configure changes the root logger: put it back after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logs.bind_node("")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_tracebacks_and_fields_are_redacted_too(
    fmt: str, restored_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret in a traceback or a field is redacted in both formats; JSON is one object a
    line with the record's fields."""
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    logs.configure("INFO", fmt, secrets=[ADMIN_TOKEN])
    logs.bind_node("node_test")
    log = logging.getLogger("relay.test")
    try:
        raise ValueError(f"bad token {ADMIN_TOKEN}")
    except ValueError:
        log.exception("failed for %s", "https://h.example/x?sig=1", extra={"webhook_id": "msg_1"})
    text = stream.getvalue()
    assert ADMIN_TOKEN not in text and "sig=1" not in text
    if fmt == "json":
        (line,) = text.splitlines()
        record = json.loads(line)
        assert set(record) >= STABLE_FIELDS
        assert record["node"] == "node_test" and record["webhook_id"] == "msg_1"
        assert record["event"] == "relay.test" and record["level"] == "ERROR"
        assert "ValueError" in record["traceback"]
    else:
        assert text.splitlines()[0].endswith(
            "ERROR relay.test failed for https://h.example/x?[redacted]"
        )


# --- A real process in JSON ----------------------------------------------------------------------


def json_lines(log_path: Path) -> list[dict[str, Any]]:
    """Every line the process wrote, each parsed as one JSON object (a line that is not fails)."""
    records = []
    for number, line in enumerate(log_path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"line {number} is not JSON: {line!r}") from None
        assert isinstance(record, dict), line
        records.append(record)
    return records


async def test_json_logs_are_one_object_a_line_with_stable_fields(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver, tmp_path: Path
) -> None:
    """With RELAY_LOG_FORMAT=json every line of `relay serve` (uvicorn's access log included)
    parses as JSON with stable fields; a retried callback carries its ids, attempt, status
    and duration; no secret and no query string appears."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    env = serve_env(
        db_url,
        upstream_url,
        RELAY_LOG_FORMAT="json",
        RELAY_ACCESS_LOG="true",
        RELAY_ADMIN_TOKEN=ADMIN_TOKEN,
    )
    receiver.responses["/hook"] = [(500, {}, 0.0), (200, {}, 0.0)]
    gen = final_generation(sim, "gen_json_logs")
    log_path = tmp_path / "relay.log"
    auth = {"authorization": f"Bearer {key.api_key}"}
    async with (
        relay_process(env, log_path) as (_, base_url),
        httpx.AsyncClient(base_url=base_url, headers=auth, timeout=10) as client,
    ):
        sub = await subscribe(client, gen.id, f"{receiver.url}/hook?token={CALLBACK_SECRET}")
        await wait_status(client, sub["id"], "delivered")
        await client.get("/v1/subscriptions", params={"status": "active", "limit": 5})
        await client.get(f"/metrics?token={ADMIN_TOKEN}", headers=admin_headers())

    records = json_lines(log_path)
    text = log_path.read_text()
    for secret in (CALLBACK_SECRET, ADMIN_TOKEN, UPSTREAM_KEY, key.api_key, key.signing_secret):
        assert secret not in text
    for record in records:
        assert set(record) >= STABLE_FIELDS, record
    by_event: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_event.setdefault(record["event"], []).append(record)
    (started,) = by_event["relay.started"]
    assert started["node"].startswith("node_")
    (retry,) = by_event["callback.retry"]
    assert retry["subscription_id"] == sub["id"]
    assert retry["webhook_id"].startswith("msg_")
    assert (retry["attempt"], retry["status_code"]) == (1, 500)
    assert isinstance(retry["duration_ms"], int) and retry["node"] == started["node"]
    requests = by_event["http.request"]
    paths = {(r["method"], r["path"], r["status_code"]) for r in requests}
    assert ("POST", "/v1/subscriptions", 201) in paths
    assert ("GET", "/v1/subscriptions?[redacted]", 200) in paths
    assert ("GET", "/metrics?[redacted]", 200) in paths
    assert all(r["logger"] == "uvicorn.access" for r in requests)


def test_libraries_copies_of_an_outage_or_a_cancelled_job_are_dropped(
    restored_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLAlchemy's pool logging a refused connection and APScheduler logging a job cancelled
    at shutdown write nothing; a library's other errors and relay's own still do."""
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    logs.configure("INFO", "text")
    dropped: list[tuple[str, BaseException]] = [
        ("sqlalchemy.pool.impl.AsyncAdaptedQueuePool", ConnectionRefusedError(111, "refused")),
        ("apscheduler.executors.default", asyncio.CancelledError()),
    ]
    kept: list[tuple[str, BaseException]] = [
        ("sqlalchemy.pool.impl.AsyncAdaptedQueuePool", ValueError("a library bug")),
        ("relay.poller", ConnectionRefusedError(111, "relay's own line")),
    ]
    for name, error in dropped + kept:
        logging.getLogger(name).error("failed", exc_info=error)
    text = stream.getvalue()
    assert text.count("failed") == 2
    assert "a library bug" in text and "relay's own line" in text
