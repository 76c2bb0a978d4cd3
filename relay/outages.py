"""Incidents in the logs: an outage is a few lines, a bug is one traceback.

An `Outage` tracks one thing relay depends on (the database, the upstream). It writes one
warning when the thing goes down (what is down, and what relay does meanwhile), a reminder at
most every `remind_every_s` while it stays down, and one line when it is back: how long it
lasted and what waited. Failures while it is down are counted, not logged.

`report_failure` is what an `except Exception` in relay calls: a failure that is an outage
(`is_outage`: the database or network cannot be reached) goes to the outage's count; anything
else is an error relay does not understand, logged with its full traceback once per kind (its
type and where it was raised) and afterwards as one line at most every minute with a count.

`quiet_outage_noise` is a logging filter for libraries that log the same outage again with a
traceback (SQLAlchemy's pool, asyncio's "exception never retrieved"): it drops those records.

This module knows no table and no route; it only classifies and logs.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import exc as sa_exc

logger = logging.getLogger(__name__)

REMIND_EVERY_S = 60.0
# SQLSTATE classes of a server that cannot serve: connection exceptions, operator
# intervention (shutting down, starting up), insufficient resources.
_OUTAGE_SQLSTATE_CLASSES = ("08", "57", "53")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)  # SQLAlchemy's wrapped driver error
        if isinstance(orig, BaseException) and id(orig) not in seen:
            yield orig
            seen.add(id(orig))
        current = current.__cause__ or current.__context__


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` means the database or the network cannot be reached (not a bug)."""
    for error in _chain(exc):
        if isinstance(error, OSError):  # refused, reset, unreachable, timed out
            return True
        if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
            return True
        if isinstance(
            error,
            sa_exc.OperationalError
            | sa_exc.InterfaceError
            | sa_exc.TimeoutError
            | sa_exc.DisconnectionError,
        ):
            return True
        sqlstate = getattr(error, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate[:2] in _OUTAGE_SQLSTATE_CLASSES:
            return True
        # asyncpg's "connection is closed" / "connection was closed in the middle of operation"
        if type(error).__module__.startswith("asyncpg") and "connection" in str(error).lower():
            return True
    return False


def reason(exc: BaseException) -> str:
    """A one-line reason: the innermost error's type and first line, short."""
    innermost = list(_chain(exc))[-1]
    text = str(innermost).strip().splitlines()[0] if str(innermost).strip() else ""
    described = f"{type(innermost).__name__}: {text}" if text else type(innermost).__name__
    return described[:200]


class Outage:
    """One dependency's outages, as a few log lines each (see the module docstring)."""

    def __init__(
        self,
        what: str,
        meanwhile: str,
        *,
        event: str,
        down: str = "is unreachable",
        up: str = "is reachable again",
        threshold: int = 1,
        remind_every_s: float = REMIND_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        log: logging.Logger = logger,
    ) -> None:
        self.what = what  # "the database"
        self.meanwhile = meanwhile  # what relay does while it is down
        self._event = event  # "database": events database.down, .still_down, .up
        self._down_words = down
        self._up_words = up
        self._threshold = threshold  # failures in a row before it counts as down
        self._remind_every_s = remind_every_s
        self._clock = clock
        self._log = log
        self._streak = 0
        self._down_since: float | None = None
        self._reminded_at = 0.0
        self._failures = 0
        self._waited: Counter[str] = Counter()

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def failed(self, why: str, waiting: str | None = None) -> None:
        """An operation failed because the dependency is unreachable; `waiting` names what
        waits because of it ("API requests answered 503", "polls"...), counted for the end."""
        now = self._clock()
        if self._down_since is None:
            self._streak += 1
            if self._streak < self._threshold:
                return
            self._down_since = self._reminded_at = now
            self._failures = 0
            self._waited.clear()
            self._log.warning(
                "%s %s (%s); meanwhile %s",
                self.what,
                self._down_words,
                why,
                self.meanwhile,
                extra={"event": f"{self._event}.down", "reason": why},
            )
        self._failures += 1
        if waiting is not None:
            self._waited[waiting] += 1
        if now - self._reminded_at >= self._remind_every_s:
            self._reminded_at = now
            down_s = now - self._down_since
            self._log.warning(
                "%s %s: still so after %.0f s (%s); %s so far",
                self.what,
                self._down_words,
                down_s,
                why,
                self._summary(),
                extra={"event": f"{self._event}.still_down", "reason": why, "down_s": down_s},
            )

    def recovered(self) -> None:
        """An operation worked: the dependency is reachable (again)."""
        self._streak = 0
        if self._down_since is None:
            return
        down_s = self._clock() - self._down_since
        self._down_since = None
        self._log.warning(
            "%s %s after %.1f s; meanwhile %s",
            self.what,
            self._up_words,
            down_s,
            self._summary(),
            extra={
                "event": f"{self._event}.up",
                "down_s": round(down_s, 3),
                "failures": self._failures,
                **{"waited": dict(self._waited)},
            },
        )

    def _summary(self) -> str:
        counts = [f"{count} {what}" for what, count in self._waited.most_common()]
        waited = ", ".join(counts) if counts else "nothing else waited"
        return f"{self._failures} operations failed ({waited})"


class _Unexpected:
    """Errors relay does not understand: a traceback once per kind, then a counted line at
    most every REMIND_EVERY_S per kind."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    @staticmethod
    def kind(exc: BaseException) -> tuple[str, str]:
        frame = exc.__traceback__
        while frame is not None and frame.tb_next is not None:
            frame = frame.tb_next
        where = f"{frame.tb_frame.f_code.co_filename}:{frame.tb_lineno}" if frame else "?"
        return type(exc).__qualname__, where

    def report(
        self, log: logging.Logger, exc: BaseException, message: str, args: tuple[Any, ...]
    ) -> None:
        kind = self.kind(exc)
        now = self._clock()
        extra = {"event": "error.unexpected", "error": kind[0]}
        if kind not in self._seen:
            self._seen[kind] = (now, 0)
            log.error(message, *args, exc_info=exc, extra=extra)
            return
        last_at, since = self._seen[kind]
        if now - last_at < REMIND_EVERY_S:
            self._seen[kind] = (last_at, since + 1)
            return
        self._seen[kind] = (now, 0)
        log.error(
            "%s: %s (again; %d more since the last line; its traceback was logged once)",
            message % args,
            reason(exc),
            since,
            extra=extra,
        )


UNEXPECTED = _Unexpected()


def report_failure(
    log: logging.Logger,
    exc: BaseException,
    outage: Outage | None,
    waiting: str,
    message: str,
    *args: Any,
) -> None:
    """What an `except Exception` calls: an outage is counted on `outage` (as `waiting`), any
    other error is logged (`message % args`) with its traceback once per kind."""
    if outage is not None and is_outage(exc):
        outage.failed(reason(exc), waiting)
        return
    UNEXPECTED.report(log, exc, message, args)


def quiet_outage_noise(record: logging.LogRecord) -> bool:
    """A logging filter: drop a library's record of an outage error (the Outage reports it)."""
    exc_info = record.exc_info
    return not (exc_info and exc_info[1] is not None and is_outage(exc_info[1]))
