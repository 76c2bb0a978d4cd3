"""What /readyz reports about the upstream: how the last polls went.

Fed by the poller, read by the API; it lives apart from both so the API does not import the
poller. An unauthorized answer is the operator's problem (the relay's own key is wrong), so it
is logged loudly, at most once a minute.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

logger = logging.getLogger(__name__)


class Answer(Protocol):
    """An upstream answer as classified by upstream.py (a poll's or the running list's)."""

    @property
    def kind(self) -> str: ...

    @property
    def error(self) -> str | None: ...


class UpstreamHealth:
    """How the last polls went, for /readyz: ok, unauthorized, unreachable or unknown."""

    def __init__(self) -> None:
        self.state = "unknown"
        self._last_alarm = 0.0

    def observe(self, result: Answer) -> None:
        if result.kind == "unauthorized":
            self.state = "unauthorized"
            now = time.monotonic()
            if now - self._last_alarm > 60:
                self._last_alarm = now
                logger.error(
                    "upstream rejects the relay's API key (%s): check RELAY_UPSTREAM_API_KEY; "
                    "polling continues slowly and no subscription is failed for it",
                    result.error,
                )
        elif result.kind == "error":
            if self.state != "unreachable":
                logger.warning("upstream requests are failing: %s", result.error)
            self.state = "unreachable"
        else:
            self.state = "ok"
