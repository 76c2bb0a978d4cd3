"""Token buckets: the upstream's request cap (per process), each client key's API limit, and
each client address's allowance of requests with unknown or revoked keys."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBucket:
    """`rate` tokens per second, holding at most `burst`; starts full."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._stamp = clock()
        self._paused_until = 0.0

    def try_take(self) -> float:
        """Take a token: 0.0 if taken, else the seconds to wait before one is there."""
        wait_s = self.peek()
        if wait_s == 0.0:
            self._tokens -= 1.0
        return wait_s

    def peek(self, tokens: float = 1.0) -> float:
        """0.0 if `tokens` are there (none is taken), else the seconds to wait for them."""
        now = self._clock()
        if now < self._paused_until:
            return self._paused_until - now
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= tokens:
            return 0.0
        return (tokens - self._tokens) / self.rate

    async def take(self) -> None:
        # The wait is computed exactly; an Event would need a producer, and time is the producer.
        while (wait_s := self.try_take()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(wait_s)

    async def take_up_to(self, most: int, least: int = 1) -> int:
        """Wait until `least` tokens are there (fewer if `most` or the burst is smaller),
        then take as many as are there, up to `most`."""
        least = max(1, min(least, most, int(self.burst)))
        while (wait_s := self.peek(least)) > 0:  # noqa: ASYNC110 (time is the producer)
            await asyncio.sleep(wait_s)
        taken = min(most, int(self._tokens))
        self._tokens -= taken
        return taken

    def give_back(self, tokens: int) -> None:
        """Return tokens taken and not used."""
        self._tokens = min(self.burst, self._tokens + tokens)

    def pause(self, seconds: float) -> None:
        """Hand out no token for `seconds` (the upstream said Retry-After)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)


class KeyedLimiter:
    """One bucket per key (a client key's id, a client address), bounded in memory: least
    recently used keys are dropped, which only ever gives a dropped key a full bucket again."""

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def peek(self, key: str) -> float:
        """What `check` would answer, without taking a token (or making a bucket)."""
        bucket = self._buckets.get(key)
        return 0.0 if bucket is None else bucket.peek()

    def check(self, key: str) -> float:
        """0.0 if the request may go on, else the seconds the client should wait."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.try_take()
