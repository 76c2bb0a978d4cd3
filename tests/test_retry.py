"""The retry policy, a pure function: every outcome class, exhaustion, jitter, Retry-After."""

from __future__ import annotations

import pytest

from relay.retry import Decision, Outcome, decide, parse_retry_after
from tests.helpers import constant

SCHEDULE = (5.0, 300.0, 1800.0)


def mid() -> float:
    """rand() at the middle of [0, 1): no jitter."""
    return 0.5


def never() -> float:
    raise AssertionError("rand() must not be called for this outcome")


@pytest.mark.parametrize("code", [200, 201, 202, 204, 299])
def test_2xx_is_done(code: int) -> None:
    """Any 2xx answer ends the delivery as done, even on the last attempt."""
    for attempt in (1, len(SCHEDULE) + 1):
        decision = decide(Outcome(code), attempt, SCHEDULE, never)
        assert decision.action == "done"
        assert decision.delay_s is None


def test_410_fails_at_once() -> None:
    """410 Gone fails the delivery on the first attempt, with no retry."""
    assert decide(Outcome(410), 1, SCHEDULE, never) == Decision(
        "fail", None, "receiver answered 410 Gone"
    )


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_3xx_is_a_failed_attempt_that_retries(code: int) -> None:
    """A redirect is not followed: it is retried like any failure and says why."""
    decision = decide(Outcome(code), 1, SCHEDULE, mid)
    assert decision.action == "retry"
    assert decision.delay_s == pytest.approx(5.0)
    assert "redirects are not followed" in decision.reason
    assert str(code) in decision.reason


@pytest.mark.parametrize("code", [400, 401, 403, 404, 409, 422, 429, 500, 502, 503, 504, 599])
def test_other_4xx_and_5xx_retry_on_the_schedule(code: int) -> None:
    """429, 5xx and 4xx other than 410 retry after the scheduled delay for this attempt."""
    for attempt, expected_s in enumerate(SCHEDULE, start=1):
        decision = decide(Outcome(code), attempt, SCHEDULE, mid)
        assert decision.action == "retry"
        assert decision.delay_s == pytest.approx(expected_s)
        assert f"receiver answered {code}" in decision.reason


def test_unregistered_status_code_is_reported_as_sent() -> None:
    """A status code outside the registry is still named in the reason."""
    assert decide(Outcome(499), 1, SCHEDULE, mid).reason == "receiver answered 499"


@pytest.mark.parametrize(
    "error",
    ["timed out after 15 s", "connection refused", "refused: localhost resolves only to blocked"],
)
def test_timeouts_and_connection_errors_retry_with_the_error_as_reason(error: str) -> None:
    """No answer at all is retried on the schedule; the reason is the error text."""
    decision = decide(Outcome(None, error=error), 2, SCHEDULE, mid)
    assert decision.action == "retry"
    assert decision.delay_s == pytest.approx(300.0)
    assert decision.reason == error


def test_missing_status_and_error_still_has_a_reason() -> None:
    """An outcome with neither a status nor an error gets a generic reason."""
    assert decide(Outcome(None), 1, SCHEDULE, mid).reason == "no answer from the receiver"


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (Outcome(500), "receiver answered 500 Internal Server Error"),
        (Outcome(429, retry_after_s=10.0), "receiver answered 429 Too Many Requests"),
        (Outcome(302), "receiver answered 302 Found; redirects are not followed"),
        (Outcome(None, "timed out after 15 s"), "timed out after 15 s"),
    ],
)
def test_after_the_last_attempt_the_delivery_fails_naming_the_last_outcome(
    outcome: Outcome, expected: str
) -> None:
    """With the schedule spent, a failure is final and its reason names what happened."""
    decision = decide(outcome, len(SCHEDULE) + 1, SCHEDULE, never)
    assert decision == Decision("fail", None, f"{expected}; no retries left after 4 attempts")


def test_empty_schedule_means_one_attempt() -> None:
    """With no retries configured, the first failure is final."""
    assert decide(Outcome(503), 1, (), never).action == "fail"


def test_attempt_numbers_start_at_one() -> None:
    """Attempt 0 is a caller bug, not a policy question."""
    with pytest.raises(ValueError):
        decide(Outcome(500), 0, SCHEDULE, mid)


@pytest.mark.parametrize(("r", "factor"), [(0.0, 0.8), (0.25, 0.9), (0.5, 1.0), (0.999999, 1.2)])
def test_jitter_maps_rand_onto_plus_minus_twenty_percent(r: float, factor: float) -> None:
    """rand() in [0, 1) spreads the delay linearly over 0.8x to 1.2x of the schedule."""
    decision = decide(Outcome(500), 2, SCHEDULE, lambda: r)
    assert decision.delay_s == pytest.approx(300.0 * factor, rel=1e-5)


def test_jitter_stays_within_bounds_for_many_draws() -> None:
    """Whatever rand() returns in [0, 1), the delay stays within 20% of the schedule."""
    draws = [i / 1000 for i in range(1000)]
    delays = [decide(Outcome(500), 1, SCHEDULE, constant(r)).delay_s for r in draws]
    assert all(d is not None and 4.0 <= d <= 6.0 for d in delays)
    assert len(set(delays)) == 1000


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_rand_out_of_range_is_a_caller_bug(bad: float) -> None:
    """A rand() outside [0, 1] is refused rather than producing a strange delay."""
    with pytest.raises(ValueError):
        decide(Outcome(500), 1, SCHEDULE, lambda: bad)


@pytest.mark.parametrize(
    ("retry_after_s", "expected_s"),
    [
        (120.0, 120.0),
        (0.0, 0.0),
        (-30.0, 0.0),
        (0.2, 0.2),
        (86_400.0, 3600.0),
        (float("inf"), 3600.0),
    ],
)
def test_retry_after_is_honoured_within_bounds(retry_after_s: float, expected_s: float) -> None:
    """Retry-After replaces the scheduled delay exactly, clamped to [0, max_retry_after_s]."""
    decision = decide(Outcome(429, retry_after_s=retry_after_s), 1, SCHEDULE, never)
    assert decision.action == "retry"
    assert decision.delay_s == expected_s
    assert "Retry-After" in decision.reason


def test_retry_after_bound_is_configurable() -> None:
    """max_retry_after_s sets the longest wait a receiver can ask for."""
    decision = decide(Outcome(503, retry_after_s=600.0), 1, SCHEDULE, never, max_retry_after_s=60.0)
    assert decision.delay_s == 60.0


def test_retry_after_is_ignored_on_success_and_on_410() -> None:
    """Retry-After matters only when there is a retry to make."""
    assert decide(Outcome(200, retry_after_s=60.0), 1, SCHEDULE, never).action == "done"
    assert decide(Outcome(410, retry_after_s=60.0), 1, SCHEDULE, never).action == "fail"


def test_nan_retry_after_falls_back_to_the_schedule() -> None:
    """A nonsensical Retry-After value is ignored in favour of the schedule."""
    decision = decide(Outcome(503, retry_after_s=float("nan")), 1, SCHEDULE, mid)
    assert decision.delay_s == pytest.approx(5.0)


NOW = 1_445_412_480.0  # Wed, 21 Oct 2015 07:28:00 GMT


@pytest.mark.parametrize(
    ("value", "expected_s"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 30 ", 30.0),
        ("1.5", 1.5),
        ("Wed, 21 Oct 2015 07:29:00 GMT", 60.0),  # IMF-fixdate
        ("Wednesday, 21-Oct-15 07:30:00 GMT", 120.0),  # obsolete RFC 850 form
        ("Wed Oct 21 07:28:30 2015", 30.0),  # obsolete asctime form, GMT by definition
        ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),  # a date in the past means now
    ],
)
def test_parse_retry_after_accepts_seconds_and_http_dates(value: str, expected_s: float) -> None:
    """Delta-seconds and every HTTP-date form become a wait in seconds."""
    assert parse_retry_after(value, NOW) == pytest.approx(expected_s)


@pytest.mark.parametrize(
    "value", [None, "", "soon", "-5", "1e3", "12 s", "٣", "Wed, 31 Feb 2015 07:28:00 GMT", "0x10"]
)
def test_parse_retry_after_ignores_garbage(value: str | None) -> None:
    """Anything that is not delta-seconds or an HTTP-date is ignored."""
    assert parse_retry_after(value, NOW) is None
