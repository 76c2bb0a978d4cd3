"""The relay's Prometheus metrics: every metric defined once, in a registry of its own per app,
and the small API the poller, the deliverer, sweeps, hints and /metrics call.

One `Metrics` per app instance (never prometheus_client's global registry), so several apps in
one process (tests) keep their own counts. Metrics are collected only when the operator can
read them (`RELAY_ADMIN_TOKEN` set): `Metrics(enabled=False)` makes every call return at once,
so turning them off costs nothing, and the cost of turning them on is what bench/ measures.

No label takes its values from users' data (no host, key, id or URL): every label has a short
fixed set of values, declared here and created at zero so `rate()` sees a series from the
first scrape. The backlog gauges are set by the caller of `exposition()` from the database
(admin.py reads store.stats at most every few seconds), so every node reports the same
cluster-wide numbers; the counters and histograms are this process's.

This module imports nothing of relay: it knows no table, no HTTP and no poller.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "attempt_class"]

POLL_OUTCOMES = ("ok", "not_found", "unauthorized", "rate_limited", "error")
SWEEP_OUTCOMES = ("ok", "partial", "unsupported", "rate_limited", "error")
HINT_OUTCOMES = ("accepted", "duplicate", "refused")
ATTEMPT_ACTIONS = {"done": "delivered", "retry": "retry", "fail": "failed"}
ATTEMPT_CLASSES = ("2xx", "3xx", "4xx", "5xx", "timeout", "network")
ENDED_EVENTS = ("completed", "failed", "canceled", "expired")
WORK_KINDS = ("poll", "delivery")
UPSTREAM_STATES = ("ok", "unauthorized", "unreachable", "unknown")

# A callback answers in milliseconds to RELAY_DELIVERY_TIMEOUT (15 s by default).
CALLBACK_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 60)
# From relay seeing the final status to the receiver's 2xx: sub-second when all is well,
# up to the retry schedule's hours when a receiver was down.
DETECTION_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200, 36000)
PAUSE_BUCKETS_S = (1, 2, 5, 10, 30, 60)


def attempt_class(status_code: int | None, error: str | None) -> str:
    """The outcome class of one callback attempt: the status family, or why none came."""
    if status_code is not None:
        family = status_code // 100
        return f"{family}xx" if 2 <= family <= 5 else "network"
    return "timeout" if error is not None and error.startswith("timed out") else "network"


class Metrics:
    """Every metric of one relay process; the methods are what the rest of relay calls."""

    def __init__(self, *, enabled: bool, version: str = "") -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=True)
        if not enabled:
            return
        r = self.registry

        def labelled(name: str, documentation: str, label: str, values: Iterable[str]) -> Any:
            """A counter with one label, its series for `values` created at zero."""
            counter = Counter(name, documentation, [label], registry=r)
            return {value: counter.labels(value) for value in values}

        Info("relay_build", "The relay's version.", registry=r).info({"version": version})
        self._polls = labelled("relay_polls", "Upstream polls.", "outcome", POLL_OUTCOMES)
        # Final upstream, or given up on (expired).
        self._ended = labelled(
            "relay_generations_ended", "Generations that ended.", "event", ENDED_EVENTS
        )
        self._sweeps = labelled(
            "relay_sweeps", "Sweeps of the running list.", "outcome", SWEEP_OUTCOMES
        )
        self._hints = labelled("relay_hints", "Upstream push hints.", "outcome", HINT_OUTCOMES)
        # Its holder died, or was too slow to renew it.
        self._takeovers = labelled(
            "relay_lease_takeovers", "Work claimed after its lease ran out.", "work", WORK_KINDS
        )
        self._429s = Counter(
            "relay_upstream_rate_limited", "Upstream answers 429 (polls and sweeps).", registry=r
        )
        self._pauses = Histogram(
            "relay_upstream_pause_seconds",
            "Pauses of all polling after an upstream 429 with Retry-After.",
            buckets=PAUSE_BUCKETS_S,
            registry=r,
        )
        attempts = Counter(
            "relay_delivery_attempts",
            "Callback attempts by outcome (delivered, retry, failed) and class of answer.",
            ["outcome", "class"],
            registry=r,
        )
        self._attempts = {
            (action, cls): attempts.labels(outcome, cls)
            for action, outcome in ATTEMPT_ACTIONS.items()
            for cls in ATTEMPT_CLASSES
        }
        self._callback_s = Histogram(
            "relay_callback_duration_seconds",
            "How long receivers took to answer a callback attempt.",
            buckets=CALLBACK_BUCKETS_S,
            registry=r,
        )
        self._detection_s = Histogram(
            "relay_detection_delay_seconds",
            "From relay recording the final status (or a later subscription or redelivery) "
            "to the receiver's 2xx.",
            buckets=DETECTION_BUCKETS_S,
            registry=r,
        )
        cluster = "(cluster-wide, from the database)"
        self._pending_generations = Gauge(
            "relay_pending_generations", f"Generations being polled {cluster}.", registry=r
        )
        self._pending_deliveries = Gauge(
            "relay_pending_deliveries", f"Callbacks waiting to be sent {cluster}.", registry=r
        )
        self._oldest_delivery_s = Gauge(
            "relay_oldest_pending_delivery_age_seconds",
            f"Age of the oldest pending callback {cluster}.",
            registry=r,
        )
        self._database_up = Gauge(
            "relay_database_up", "1 if the last backlog read worked, else 0.", registry=r
        )
        upstream = Gauge(
            "relay_upstream_state",
            "How this process's last polls went: 1 for the current state.",
            ["state"],
            registry=r,
        )
        self._upstream = {s: upstream.labels(s) for s in UPSTREAM_STATES}

    # --- The worker's side ---------------------------------------------------------------

    def poll(self, outcome: str) -> None:
        """One poll's outcome (upstream.PollResult.kind); rate_limited is an upstream 429."""
        if self.enabled:
            self._upstream_answer(self._polls, outcome)

    def generation_ended(self, event: str) -> None:
        """A generation ended; `event` is the callback event (generation.completed...)."""
        if self.enabled:
            self._ended[event.rsplit(".", 1)[-1]].inc()

    def upstream_paused(self, pause_s: float) -> None:
        """All polling pauses for `pause_s` after a 429 with Retry-After."""
        if self.enabled:
            self._pauses.observe(pause_s)

    def sweep(self, outcome: str) -> None:
        """One batch sweep's outcome (one of SWEEP_OUTCOMES); rate_limited is an upstream 429."""
        if self.enabled:
            self._upstream_answer(self._sweeps, outcome)

    def _upstream_answer(self, counters: dict[str, Any], outcome: str) -> None:
        counters[outcome].inc()
        if outcome == "rate_limited":
            self._429s.inc()

    def hint(self, outcome: str) -> None:
        """One push hint's outcome: accepted, duplicate or refused."""
        if self.enabled:
            self._hints[outcome].inc()

    def attempt(
        self,
        status_code: int | None,
        error: str | None,
        duration_ms: int | None,
        action: str,
        since_queued: timedelta,
    ) -> None:
        """One callback attempt: its answer, how long it took, what was decided (done, retry,
        fail) and how long ago its delivery was queued."""
        if not self.enabled:
            return
        self._attempts[action, attempt_class(status_code, error)].inc()
        if duration_ms is not None:
            self._callback_s.observe(duration_ms / 1000)
        if action == "done":
            self._detection_s.observe(max(0.0, since_queued.total_seconds()))

    def takeovers(self, work: str, previous_owners: Iterable[str | None]) -> None:
        """Claimed items of `work` (poll, delivery); those with a previous owner were taken
        over after their lease ran out."""
        if self.enabled:
            count = sum(1 for owner in previous_owners if owner is not None)
            if count:
                self._takeovers[work].inc(count)

    # --- Read at scrape time ---------------------------------------------------------------

    def set_backlog(
        self, pending_generations: int, pending_deliveries: int, oldest_delivery_age_s: float
    ) -> None:
        """The cluster-wide backlog, as last read from the database."""
        if self.enabled:
            self._pending_generations.set(pending_generations)
            self._pending_deliveries.set(pending_deliveries)
            self._oldest_delivery_s.set(oldest_delivery_age_s)

    def set_database_up(self, up: bool) -> None:
        if self.enabled:
            self._database_up.set(1 if up else 0)

    def set_upstream_state(self, state: str) -> None:
        if self.enabled:
            for name, gauge in self._upstream.items():
                gauge.set(1 if name == state else 0)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)

    def counts(self, name: str) -> dict[str, float]:
        """A counter's current values by its first label (for the dashboard), {} when off."""
        if not self.enabled:
            return {}
        values: dict[str, float] = {}
        for family in self.registry.collect():
            if family.name != name:
                continue
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = next(iter(sample.labels.values()), "")
                    values[key] = values.get(key, 0.0) + sample.value
        return values
