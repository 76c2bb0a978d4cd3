"""A value read at most every few seconds: what the operator's pages show from the database.

`Cached(read, max_age_s).get()` answers the last read while it is younger than `max_age_s`;
else one caller reads again while the others wait for that read. A failed read (or one slower
than READ_TIMEOUT_S) is remembered as None for as long, so a database that is down is not asked
by every request, and a page still answers with what it has. Knows nothing of what is read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from relay import outages

logger = logging.getLogger(__name__)

T = TypeVar("T")

READ_TIMEOUT_S = 3.0  # a page answers with what it has even if the database hangs


class Cached(Generic[T]):
    """The answer of `read`, read again at most every `max_age_s`, by one caller at a time
    (the others wait for that read). A failed read is remembered as None for as long, so a
    database that is down is not asked by every request."""

    def __init__(self, read: Callable[[], Awaitable[T]], max_age_s: float) -> None:
        self._read = read
        self._max_age_s = max_age_s
        self._value: T | None = None
        self._read_at: float | None = None
        self._lock = asyncio.Lock()

    def _fresh(self) -> bool:
        return self._read_at is not None and time.monotonic() - self._read_at < self._max_age_s

    async def get(self) -> T | None:
        if self._fresh():
            return self._value
        async with self._lock:
            if not self._fresh():
                try:
                    async with asyncio.timeout(READ_TIMEOUT_S):
                        self._value = await self._read()
                except Exception as exc:
                    # The database's outage is reported where it is seen (outages.py); a
                    # bug in a query is not: say it, without hiding the page.
                    if not outages.is_outage(exc):
                        logger.warning(
                            "reading the operator's numbers failed: %s",
                            outages.reason(exc),
                            extra={"event": "admin.read_failed"},
                        )
                    self._value = None
                self._read_at = time.monotonic()
            return self._value
