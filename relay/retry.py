"""The callback retry policy: what to do after one delivery attempt.

This module owns the decision, and only the decision. `decide()` maps the outcome of an
attempt to `done`, `retry` after a delay, or `fail`, following the callback section of the
contract:

- any 2xx is success;
- 410 Gone ends the subscription at once;
- 3xx is an ordinary failed attempt, because redirects are never followed;
- 429, 5xx, other 4xx, timeouts and connection errors are retried on the schedule with
  +/-20% jitter;
- a `Retry-After` answer is honoured as given, clamped to [0, max_retry_after_s], with no
  jitter: the receiver named the moment it wants, and the clamp keeps a hostile or buggy
  value from parking a delivery for days;
- when the schedule is spent, the delivery fails with the last outcome as the reason.

It must stay pure: no I/O, no clock reads, no global randomness (the caller injects
`rand` and `now_unix`), so every branch is tested without sleeping or patching.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Literal

__all__ = ["JITTER", "Decision", "Outcome", "decide", "parse_retry_after"]

# Each scheduled delay is spread over [1 - JITTER, 1 + JITTER] of itself so callbacks that
# failed together (a receiver outage) do not all come back in the same instant.
JITTER = 0.2

_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to: an HTTP status, or an error when no answer came."""

    status_code: int | None
    error: str | None = None
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do next; `delay_s` is set only when `action` is `retry`."""

    action: Literal["done", "retry", "fail"]
    delay_s: float | None
    reason: str


def decide(
    outcome: Outcome,
    attempt: int,
    schedule_s: Sequence[float],
    rand: Callable[[], float],
    max_retry_after_s: float = 3600.0,
) -> Decision:
    """Decide what follows attempt number `attempt` (1-based) that ended in `outcome`.

    `schedule_s[n - 1]` is the wait before retry n, so a delivery gets `1 + len(schedule_s)`
    attempts in all. `rand` returns a float in [0, 1) (1 is tolerated); it is called only
    when retrying on the schedule.
    """
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")

    code = outcome.status_code
    if code is not None and 200 <= code <= 299:
        return Decision("done", None, f"receiver answered {_describe(code)}")
    if code == 410:
        return Decision("fail", None, "receiver answered 410 Gone")

    reason = _failure_reason(outcome)
    if attempt > len(schedule_s):
        return Decision("fail", None, f"{reason}; no retries left after {attempt} attempts")

    retry_after_s = outcome.retry_after_s
    if retry_after_s is not None and not math.isnan(retry_after_s):
        delay_s = min(max(retry_after_s, 0.0), max_retry_after_s)
        return Decision("retry", delay_s, f"{reason}; retrying as its Retry-After asks")

    r = rand()
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"rand() must return a number in [0, 1], got {r!r}")
    delay_s = max(schedule_s[attempt - 1], 0.0) * (1.0 - JITTER + 2 * JITTER * r)
    return Decision("retry", delay_s, reason)


def _failure_reason(outcome: Outcome) -> str:
    code = outcome.status_code
    if code is None:
        return outcome.error or "no answer from the receiver"
    if 300 <= code <= 399:
        return f"receiver answered {_describe(code)}; redirects are not followed"
    return f"receiver answered {_describe(code)}"


def _describe(code: int) -> str:
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:  # a status code outside the registry is still reported as sent
        return str(code)


def parse_retry_after(value: str | None, now_unix: float) -> float | None:
    """Return the wait a `Retry-After` header asks for, in seconds, or None if unusable.

    Accepts delta-seconds (fractions tolerated) and HTTP-dates; a date in the past means
    no wait. Anything else is ignored rather than trusted, so the schedule applies.
    """
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # HTTP-dates are always GMT, even in the asctime form that does not say so.
        when = when.replace(tzinfo=UTC)
    return max(when.timestamp() - now_unix, 0.0)
