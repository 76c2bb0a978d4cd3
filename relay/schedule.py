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


def unchanged_polls_for(age_s: float, min_s: float, max_s: float) -> int:
    """How many unchanged polls the adaptive schedule would have made in `age_s` seconds
    without a status change: what a generation that sweeps listed (instead of polling it)
    resumes per-id polling from, so its next gap fits its age."""
    polls, elapsed_s = 0, 0.0
    while polls < 64:
        gap_s = min(max_s, min_s * GROWTH**polls)
        if elapsed_s + gap_s > age_s or gap_s >= max_s:
            break
        elapsed_s += gap_s
        polls += 1
    return polls


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
# every generation it lists. A sweep pays for itself when it replaces at least SWEEP_REPLACES
# per-id polls: a generation that relies on polls is budgeted one per SWEEP_BUDGET_GAPS
# shortest gaps (8 s with the defaults; relay's adaptive schedule costs about one per 9 s
# across the mix, so a sweep at the threshold still replaces ~1.75 polls), one that
# push hints cover one per HINTED_BUDGET_INTERVALS safety-net intervals. The cadence is the
# fastest that pays, never under RELAY_SWEEP_MIN_INTERVAL, and never slower than the per-id
# polls it replaces (else they would do as well): with the defaults a sweep every 2 s from
# eight polled generations, every 1.6 s from ten (sooner than a 3 s polling loop would see a
# final), every second from sixteen; with one generation, never.
SWEEP_REPLACES = 2.0
SWEEP_BUDGET_GAPS = 4.0
HINTED_BUDGET_INTERVALS = 3.0


def sweep_interval_s(
    covered: float,
    hinted: float,
    hinted_due: float,
    *,
    min_interval_s: float,
    poll_min_interval_s: float,
    hinted_interval_s: float,
) -> float | None:
    """Seconds between sweeps, or None when no sweep pays for itself now.

    `covered`: generations a sweep is expected to list that rely on polls to detect their
    final status; `hinted`: those push hints cover (a sweep is their cheap safety net for a
    lost hint); `hinted_due`: of those, the ones whose safety-net poll is due.
    """
    candidates = []
    if covered > 0:
        budget_s = SWEEP_BUDGET_GAPS * poll_min_interval_s
        interval_s = max(min_interval_s, SWEEP_REPLACES * budget_s / covered)
        if interval_s <= poll_min_interval_s:
            candidates.append(interval_s)
    if hinted > 0:
        budget_s = HINTED_BUDGET_INTERVALS * hinted_interval_s
        interval_s = max(min_interval_s, SWEEP_REPLACES * budget_s / hinted)
        if interval_s <= hinted_interval_s:
            candidates.append(interval_s)
    if hinted_due >= SWEEP_REPLACES:
        candidates.append(min_interval_s)
    return min(candidates, default=None)


# A terminal push hint the GET does not confirm yet is believed this long (the webhook may
# outrun the GET), with polls at the shortest gap meanwhile; then the GET's word stands.
TERMINAL_HINT_PATIENCE_S = 120.0


def hinted_gap_s(hinted_interval_s: float, rand: Callable[[], float]) -> float:
    """Seconds until the safety-net poll of a generation push hints cover (jittered)."""
    return hinted_interval_s * (1.0 + JITTER * (2.0 * rand() - 1.0))
