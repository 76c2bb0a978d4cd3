"""Drains: a tick runs one drain at a time, and is never lost.

The poller and the deliverer each drain due work from the database in rounds. A tick that
arrives while a drain runs (a kick from new work, or the scheduler) makes that drain look
once more when it ends, instead of being dropped: work committed after the drain's last claim
would otherwise wait for the next scheduled tick.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class Drainer:
    """Base of Poller and Deliverer: `tick()` runs `_drain()` until no tick came meanwhile."""

    def __init__(self) -> None:
        self._draining = False
        self._again = False
        self._closing = False

    async def tick(self) -> None:
        if self._closing:
            return
        if self._draining:
            self._again = True
            return
        self._draining = True
        try:
            while True:
                self._again = False
                await self._drain()
                if not self._again or self._closing:
                    break
        except Exception:
            logger.exception("%s tick failed; the next tick retries", type(self).__name__)
        finally:
            self._draining = False

    async def _drain(self) -> None:
        raise NotImplementedError
