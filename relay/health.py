"""What /readyz reports about the upstream: how the last polls went; and the upstream's
outages in the logs.

Fed by the poller, read by the API; it lives apart from both so the API does not import the
poller. An upstream that cannot be reached (errors, timeouts, 5xx: three polls in a row) and
one that refuses the relay's own key (the operator's problem: RELAY_UPSTREAM_API_KEY) are each
an outage (outages.py): one warning when it starts, a reminder at most every minute, one line
when it ends.
"""

from __future__ import annotations

from typing import Protocol

from relay.outages import Outage

UNREACHABLE_MEANWHILE = (
    "polls back off (each generation is tried again within RELAY_POLL_MAX_INTERVAL); "
    "subscriptions stay active and none is failed for it"
)
REFUSED_MEANWHILE = (
    "polling goes on slowly (every RELAY_POLL_MAX_INTERVAL) and no subscription is failed for "
    "it; check RELAY_UPSTREAM_API_KEY"
)
FAILED_POLLS_BEFORE_AN_OUTAGE = 3  # one 502 is not an outage


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
        self._unreachable = Outage(
            "the upstream",
            UNREACHABLE_MEANWHILE,
            event="upstream",
            threshold=FAILED_POLLS_BEFORE_AN_OUTAGE,
        )
        self._refused = Outage(
            "the upstream",
            REFUSED_MEANWHILE,
            event="upstream_key",
            down="refuses relay's API key",
            up="accepts relay's API key again",
        )

    def observe(self, result: Answer) -> None:
        if result.kind == "unauthorized":
            self.state = "unauthorized"
            self._refused.failed(result.error or "unauthorized", "polls")
        elif result.kind == "error":
            self.state = "unreachable"
            self._unreachable.failed(result.error or "error", "polls")
        else:
            self.state = "ok"
            self._unreachable.recovered()
            self._refused.recovered()
