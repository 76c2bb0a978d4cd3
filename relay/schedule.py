"""When to poll a generation next: pure functions of what the last polls saw.

While the status does not change the gap grows geometrically from the minimum toward the
maximum (most generations finish within a few of their typical durations, so early polls are
where detection delay is won and late polls are where upstream cost is saved); a change brings
it back to the minimum. Errors back off exponentially on their own counter, and a Retry-After
from the upstream is honoured. Jitter (±10%) keeps generations created together from polling
together forever.
"""

from __future__ import annotations

from collections.abc import Callable

GROWTH = 1.5
JITTER = 0.1


def poll_gap_s(
    unchanged_polls: int, min_s: float, max_s: float, rand: Callable[[], float]
) -> float:
    """Seconds until the next poll after `unchanged_polls` polls that saw no change."""
    base = min(max_s, min_s * GROWTH ** min(unchanged_polls, 64))
    return _jittered(base, min_s, max_s, rand)


def error_gap_s(
    error_count: int,
    min_s: float,
    max_s: float,
    rand: Callable[[], float],
    retry_after_s: float | None = None,
) -> float:
    """Seconds until the next poll after `error_count` failed polls in a row (≥ 1)."""
    base = min(max_s, min_s * 2.0 ** min(max(error_count - 1, 0), 64))
    gap = _jittered(base, min_s, max_s, rand)
    if retry_after_s is not None:
        # Honour the upstream's word, but never park a generation for more than an hour.
        gap = max(gap, min(retry_after_s, 3600.0))
    return gap


def _jittered(base: float, min_s: float, max_s: float, rand: Callable[[], float]) -> float:
    factor = 1.0 + JITTER * (2.0 * rand() - 1.0)
    return min(max(base * factor, min_s), max_s)
