"""RELAY_MAX_ACTIVE_PER_KEY without counting a key's subscriptions on every create.

Counting a key's active subscriptions costs a range scan as long as the count, too much for
every create batch of a key with tens of thousands. So each process keeps, per key, the
count it last made in a create transaction plus what it has created since, and asks the
batch to count again (exactly, in the transaction, the key's row locked) when that estimate
is near the quota (the last tenth of it) or old (one second near the upper half, ten below).
Subscriptions that end only make the estimate high, which errs on the side of counting.

Pure: no I/O, no clock but the one given.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

FRESH_NEAR_S = 1.0  # how old an estimate may be from half the quota up
FRESH_FAR_S = 10.0  # and below half of it
MAX_KEYS = 10_000


class ActiveEstimates:
    """Per key: active subscriptions as last counted, plus those created since."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.slack = max(100, limit // 10)
        self._clock = clock
        self._by_key: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def needs_count(self, key_id: str) -> bool:
        """Whether the next create of this key must count its active subscriptions."""
        known = self._by_key.get(key_id)
        if known is None:
            return True
        estimate, counted_at = known
        if estimate >= self.limit - self.slack:
            return True
        max_age_s = FRESH_NEAR_S if estimate >= self.limit // 2 else FRESH_FAR_S
        return self._clock() - counted_at > max_age_s

    def counted(self, key_id: str, active: int) -> None:
        """A create transaction counted `active` (its own new ones included)."""
        self._by_key.pop(key_id, None)
        self._by_key[key_id] = (active, self._clock())
        if len(self._by_key) > MAX_KEYS:
            self._by_key.popitem(last=False)

    def created(self, key_id: str, new: int = 1) -> None:
        """This process made `new` subscriptions of the key without counting."""
        known = self._by_key.get(key_id)
        if known is not None:
            self._by_key[key_id] = (known[0] + new, known[1])
