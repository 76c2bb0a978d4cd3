"""Per-receiver-host slots: how many callbacks a host has in flight, who waits, who goes back.

A receiver that hangs until the timeout holds at most `per_host` slots, and as many claimed
deliveries wait here for them; a delivery claimed beyond that is surplus, given back to the
table (with the host's due backlog) for `defer_s(host)`: about the time the host's queue here
takes to drain, judged by a moving average of its attempt durations, or by how long it has
been stuck at its limit when nothing has finished to average.

`HostSlots` is pure bookkeeping: time and randomness are injected (a clock and a rand
function), and it must not do I/O, start tasks or know what an item is; the deliverer starts
what it says to start and gives back what it says is surplus.
"""

from __future__ import annotations

import enum
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

DEFER_MIN_S = 0.1
DEFER_MAX_S = 60.0

T = TypeVar("T")


class Offer(enum.Enum):
    """Where an offered item goes."""

    START = "start"  # a slot is free and now taken by it: send it now
    WAIT = "wait"  # queued behind the host's slots; `release` hands it out
    SURPLUS = "surplus"  # the host's slots and queue are full: give it back to the table


class HostSlots(Generic[T]):
    """Slots per host (at most `per_host` in use, at most `per_host` waiting per host)."""

    def __init__(
        self,
        per_host: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._per_host = per_host
        self._clock = clock
        self._rand = rand
        self._in_use: dict[str, int] = {}
        self._waiting: dict[str, deque[T]] = {}
        self._waiting_count = 0
        self._latency_s: dict[str, float] = {}  # moving average of attempt durations
        self._saturated_since: dict[str, float] = {}  # clock time it hit its limit

    @property
    def waiting_count(self) -> int:
        return self._waiting_count

    def waiting(self) -> list[T]:
        """Every item waiting for a slot, host by host."""
        return [item for queue in self._waiting.values() for item in queue]

    def in_use(self, host: str) -> int:
        return self._in_use.get(host, 0)

    def latency_s(self, host: str) -> float | None:
        """The host's moving average of attempt durations; None once it is forgotten."""
        return self._latency_s.get(host)

    def offer(self, host: str, item: T) -> Offer:
        """Take a slot of `host` for `item`, or queue it, or call it surplus."""
        if self._in_use.get(host, 0) < self._per_host:
            self._take(host)
            return Offer.START
        queue = self._waiting.get(host)
        if queue is None or len(queue) < self._per_host:
            self._waiting.setdefault(host, deque()).append(item)
            self._waiting_count += 1
            return Offer.WAIT
        return Offer.SURPLUS

    def release(self, host: str, duration_s: float | None) -> T | None:
        """The host has answered (or failed) after `duration_s` (None: no duration to
        average). Its slot goes to its next waiting item, returned to be started; a host
        with nothing in flight and nothing waiting is forgotten."""
        if duration_s is not None:
            previous = self._latency_s.get(host, duration_s)
            self._latency_s[host] = 0.8 * previous + 0.2 * duration_s
        self._in_use[host] -= 1
        self._saturated_since.pop(host, None)
        queue = self._waiting.get(host)
        if queue:
            self._waiting_count -= 1
            following = queue.popleft()
            if not queue:
                del self._waiting[host]
            self._take(host)
            return following
        if self._in_use[host] <= 0:
            del self._in_use[host]
            self._latency_s.pop(host, None)
        return None

    def take_waiting(self) -> list[T]:
        """Empty every queue (closing): the items that were waiting, to be given back."""
        waiting = self.waiting()
        self._waiting.clear()
        self._waiting_count = 0
        return waiting

    def defer_s(self, host: str) -> float:
        """How long to give a saturated host's deliveries back for: about the time its queue
        here takes to drain, so a slow receiver's backlog does not come back to the front
        of the table every second ahead of healthy receivers, while a fast receiver's comes
        back in a moment. A host that hangs has finished nothing to average: it has taken at
        least as long as it has been at its limit, so its delay doubles each time it comes
        back still stuck. Jittered by +/-20%."""
        queue = self._waiting.get(host)
        queued = self._in_use.get(host, 0) + (len(queue) if queue else 0)
        latency_s = self._latency_s.get(host, 0.0)
        saturated_since = self._saturated_since.get(host)
        if saturated_since is not None:
            latency_s = max(latency_s, self._clock() - saturated_since)
        drain_s = queued / self._per_host * latency_s
        return min(max(DEFER_MIN_S, drain_s), DEFER_MAX_S) * (0.8 + 0.4 * self._rand())

    def _take(self, host: str) -> None:
        self._in_use[host] = in_use = self._in_use.get(host, 0) + 1
        if in_use >= self._per_host:
            self._saturated_since.setdefault(host, self._clock())
