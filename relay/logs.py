"""Logging for the whole process: text or JSON lines, uvicorn's loggers included, secrets and
callback query strings redacted before anything is written.

`configure(level, fmt, secrets)` installs one handler on the root logger and makes uvicorn's
loggers (`uvicorn.error`, and `uvicorn.access` when RELAY_ACCESS_LOG is on) propagate to it,
so every line the process writes has one shape. JSON lines are python-json-logger's (it
formats stdlib records, so uvicorn's, alembic's and APScheduler's lines need no change); each
is one object with stable names: `time`, `level`, `logger`, `message`, `event`, `node`, and
the fields a log call passes with `extra=` (`generation_id`, `subscription_id`, `webhook_id`,
`attempt`, `status_code`, `duration_ms`, `host`...). A record without an `event` gets its
logger's name.

Redaction runs on the finished line (message, fields and traceback alike): the query string of
any URL, user:password in URLs, bearer tokens, `whsec_` signing secrets, `rk_` API keys and the
configured secrets' values (the upstream key, the admin token). The access log's paths lose
their query strings (`?token=` of the dashboard) before they are formatted.

SQLAlchemy's pool and asyncio log a dead connection again with a traceback, APScheduler a job
cancelled at shutdown; those records are dropped (outages.py reports an outage once). This module imports nothing of relay but
outages.py's classifier: anything may log.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pythonjsonlogger.json import JsonFormatter

from relay.outages import quiet_outage_noise

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
QUIET_LOGGERS = ("apscheduler", "alembic")  # their INFO lines (every tick) drown relay's own
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
REDACTED = "[redacted]"

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://user:password@ -> scheme://user:[redacted]@
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/:@\"'<>]*:)[^\s/@\"'<>]*@"), rf"\1{REDACTED}@"),
    # the query string of any absolute URL (callback URLs carry tokens there)
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#\"'<>]*)\?[^\s#\"'<>]*"), rf"\1?{REDACTED}"),
    (re.compile(r"(?i)(\bbearer\s+)[^\s\"',;]+"), rf"\1{REDACTED}"),
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=]+"), f"whsec_{REDACTED}"),
    (re.compile(r"\brk_[A-Za-z0-9_-]{8,}"), f"rk_{REDACTED}"),
)


class Redactor:
    """Removes secrets from text: the patterns above and the exact `secrets` given."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        # Short values would redact ordinary words; the settings refuse such secrets anyway.
        self._secrets = sorted({s for s in secrets if s and len(s) >= 8}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text


def shown_url(url: str) -> str:
    """A URL as relay shows it to operators (dashboard, CLI): no user:password, query string
    or fragment; `?…` says a query string was there."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
        shown = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "(unreadable URL)"
    return shown + ("?…" if parts.query else "")


def strip_query(path: str) -> str:
    """A request path without its query string (the dashboard's `?token=` among others)."""
    head, sep, _ = path.partition("?")
    return f"{head}?{REDACTED}" if sep else head


class _Context(logging.Filter):
    """Stamps every record with this process's node id and a default `event`."""

    def __init__(self) -> None:
        super().__init__()
        self.node: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "node"):
            record.node = self.node
        if not hasattr(record, "event"):
            record.event = record.name
        return True


class _AccessFields(logging.Filter):
    """uvicorn's access lines as fields, their paths without query strings."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5:
            client, method, path, http_version, status_code = args
            path = strip_query(str(path))
            record.args = (client, method, path, http_version, status_code)
            record.event = "http.request"
            record.client = client
            record.method = method
            record.path = path
            record.status_code = status_code
        return True


CONTEXT = _Context()
NOISY_LIBRARIES = ("sqlalchemy", "asyncio", "aiosqlite", "asyncpg", "apscheduler")


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """Drop a library's traceback of an outage (reported once by outages.py) or of a task
    cancelled at shutdown (APScheduler cancels a job still running when the worker stops)."""
    if record.name.split(".", 1)[0] not in NOISY_LIBRARIES:
        return True
    if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
        return False
    return quiet_outage_noise(record)


def bind_node(node: str) -> None:
    """Name this process's node on every line from now on (the app's lifespan calls it)."""
    CONTEXT.node = node


class _RedactingText(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__(TEXT_FORMAT)
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(super().format(record))


class _RedactingJson(JsonFormatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__(
            ["levelname", "name", "message"],
            rename_fields={"levelname": "level", "name": "logger", "exc_info": "traceback"},
            timestamp="time",
        )
        self._redact = redact

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        log_data["time"] = (
            datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")[:-6]
            + "Z"
        )

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(super().format(record))


def configure(level: str, fmt: str, secrets: Iterable[str | None] = ()) -> None:
    """Send every logger's lines to stderr as `fmt` (text or json), redacted."""
    redact = Redactor(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingJson(redact) if fmt == "json" else _RedactingText(redact))
    handler.addFilter(CONTEXT)
    handler.addFilter(_quiet_libraries)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in UVICORN_LOGGERS:
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _AccessFields) for f in access.filters):
        access.addFilter(_AccessFields())
