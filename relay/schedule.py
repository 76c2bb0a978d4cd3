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


# Sweeps: one request lists up to 100 running generations, replacing the per-id polls of
# every generation it lists. Each generation a sweep covers is budgeted one list request per
# SWEEP_BUDGET_GAPS shortest poll gaps (10 s with the defaults: about what the adaptive per-id
# schedule spends on a generation across the mix, and a third of what a 3-second loop
# spends), so the sweep cadence speeds up with the number of generations it covers: every
# 5 s for two, every second from ten on. A sweep must cover at least two generations: for
# one, a sweep and then the GET of its final body cost more than polling it by id.
SWEEP_BUDGET_GAPS = 5.0
SWEEP_MIN_COVERED = 2.0


def sweep_interval_s(
    covered: float,
    hinted_due: float,
    min_interval_s: float,
    max_interval_s: float,
    budget_s: float,
) -> float | None:
    """Seconds between sweeps, or None when no sweep pays for itself now.

    `covered`: generations a sweep is expected to list that rely on polling for detection
    (not covered by flowing push hints); `hinted_due`: generations covered by push hints
    whose safety-net poll is due, expected to be listed. Push hints detect finals by
    themselves, so their generations make a sweep pay only by replacing due safety polls.
    `budget_s`: how often each covered generation may cost a list request.
    """
    if covered >= SWEEP_MIN_COVERED:
        return min(max(min_interval_s, budget_s / covered), max_interval_s)
    if hinted_due >= SWEEP_MIN_COVERED:
        return min_interval_s
    return None


# A terminal push hint the GET does not confirm yet is believed this long (the webhook may
# outrun the GET), with polls at the shortest gap meanwhile; then the GET's word stands.
TERMINAL_HINT_PATIENCE_S = 120.0


def hinted_gap_s(hinted_interval_s: float, rand: Callable[[], float]) -> float:
    """Seconds until the safety-net poll of a generation push hints cover (jittered)."""
    return hinted_interval_s * (1.0 + JITTER * (2.0 * rand() - 1.0))
