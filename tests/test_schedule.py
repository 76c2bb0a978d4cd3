"""The pure parts of polling: gaps (schedule.py), upstream answers (upstream.classify and
normalize_status) and what one poll changes on a generation (poller.plan_record)."""

from __future__ import annotations

import dataclasses
import itertools
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import orjson
import pytest

from relay import store
from relay.config import Settings
from relay.models import Listing
from relay.poller import plan_record
from relay.schedule import (
    GROWTH,
    JITTER,
    SWEEP_BUDGET_GAPS,
    SWEEP_REPLACES,
    error_gap_s,
    hinted_gap_s,
    poll_gap_s,
    sweep_interval_s,
    unchanged_polls_for,
)
from relay.statuses import FINAL_STATUSES, normalize_status
from relay.upstream import PollResult, classify
from tests.helpers import constant

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
SETTINGS = Settings(
    poll_min_interval_s=2.0,
    poll_max_interval_s=30.0,
    generation_ttl_s=86400.0,
    not_found_grace_s=600.0,
)
NOTICE_KEYS = {"id", "status", "input", "data", "usage", "code", "message"}


def mid() -> float:
    """rand() at the middle of [0, 1): no jitter."""
    return 0.5


def claimed(**changes: object) -> store.ClaimedGeneration:
    values: dict[str, object] = {
        "id": "gen_123",
        "status": "IN_QUEUE",
        "first_subscribed_at": NOW - timedelta(seconds=60),
        "status_changed_at": None,
        "unchanged_polls": 0,
        "error_count": 0,
        "not_found_since": None,
    }
    values.update(changes)
    return store.ClaimedGeneration(**values)  # type: ignore[arg-type]


def ok(status: str, body: dict[str, object] | None = None) -> PollResult:
    content = orjson.dumps(body or {"id": "gen_123", "status": status, "data": None})
    return classify(200, content, None)


def gap_of(record: store.PollRecord) -> float:
    next_poll_at = record.values["next_poll_at"]
    assert isinstance(next_poll_at, datetime)
    return (next_poll_at - NOW).total_seconds()


# --- schedule.poll_gap_s ----------------------------------------------------------------------


def test_poll_gap_starts_at_the_minimum_and_grows_by_half_per_unchanged_poll() -> None:
    """Without jitter the gap is min, then 1.5 times longer for each poll that saw no change."""
    gaps = [poll_gap_s(n, 2.0, 1000.0, mid) for n in range(6)]
    assert gaps[0] == pytest.approx(2.0)
    for before, after in itertools.pairwise(gaps):
        assert after == pytest.approx(before * GROWTH)


def test_poll_gap_is_capped_at_the_maximum() -> None:
    """However long nothing changes, the gap never exceeds the maximum."""
    assert poll_gap_s(10, 2.0, 30.0, mid) == pytest.approx(30.0)
    assert poll_gap_s(10_000, 2.0, 30.0, lambda: 0.999) == pytest.approx(30.0)


def test_poll_gap_jitter_is_ten_percent_either_way() -> None:
    """rand() spreads a gap over ±10% of its base value."""
    base = 2.0 * GROWTH**3
    assert poll_gap_s(3, 2.0, 30.0, lambda: 0.0) == pytest.approx(base * (1 - JITTER))
    assert poll_gap_s(3, 2.0, 30.0, lambda: 1.0) == pytest.approx(base * (1 + JITTER))
    spread = {round(poll_gap_s(3, 2.0, 30.0, constant(r)), 6) for r in (0.1, 0.3, 0.7, 0.9)}
    assert len(spread) == 4


def test_poll_gap_jitter_never_leaves_min_max() -> None:
    """Jitter does not take a gap below the minimum or above the maximum."""
    assert poll_gap_s(0, 2.0, 30.0, lambda: 0.0) == pytest.approx(2.0)
    assert poll_gap_s(50, 2.0, 30.0, lambda: 1.0) == pytest.approx(30.0)


# --- schedule.error_gap_s ---------------------------------------------------------------------


def test_error_gap_doubles_per_error_up_to_the_maximum() -> None:
    """Errors in a row back off exponentially from the minimum, capped at the maximum."""
    gaps = [error_gap_s(n, 2.0, 30.0, mid) for n in range(1, 7)]
    assert gaps == pytest.approx([2.0, 4.0, 8.0, 16.0, 30.0, 30.0])


def test_error_gap_honours_retry_after_even_beyond_the_maximum() -> None:
    """A Retry-After longer than the backoff wins, even when longer than the maximum gap."""
    assert error_gap_s(1, 2.0, 30.0, mid, retry_after_s=7.0) == pytest.approx(7.0)
    assert error_gap_s(1, 2.0, 30.0, mid, retry_after_s=120.0) == pytest.approx(120.0)


def test_error_gap_keeps_its_backoff_when_retry_after_is_shorter() -> None:
    """A Retry-After shorter than the backoff does not shorten it."""
    assert error_gap_s(4, 2.0, 30.0, mid, retry_after_s=1.0) == pytest.approx(16.0)


def test_error_gap_caps_a_huge_retry_after_at_an_hour() -> None:
    """A hostile Retry-After cannot park a generation for more than an hour."""
    assert error_gap_s(1, 2.0, 30.0, mid, retry_after_s=10.0**9) == pytest.approx(3600.0)


# --- upstream.normalize_status and classify --------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("COMPLETED", "COMPLETED"),
        ("completed", "COMPLETED"),
        ("Completed", "COMPLETED"),
        ("SUCCEEDED", "COMPLETED"),
        ("succeeded", "COMPLETED"),
        ("CANCELLED", "CANCELED"),
        ("cancelled", "CANCELED"),
        ("canceled", "CANCELED"),
        ("failed", "FAILED"),
        ("in_queue", "IN_QUEUE"),
        ("In_Progress", "IN_PROGRESS"),
        ("starting", "IN_QUEUE"),
        ("processing", "IN_PROGRESS"),
    ],
)
def test_statuses_are_case_insensitive_with_the_old_aliases(raw: str, expected: str) -> None:
    """Any case and the legacy vocabulary map to the canonical status."""
    assert normalize_status(raw) == expected


@pytest.mark.parametrize("raw", ["WARMING_UP", "paused", "", "done?"])
def test_an_unknown_status_is_not_final(raw: str) -> None:
    """A status upstream never documented is not taken for a final one."""
    assert normalize_status(raw) not in FINAL_STATUSES


def test_a_200_body_is_kept_exactly_as_sent() -> None:
    """The result body is kept byte for byte, unknown fields and spacing included."""
    content = b'{"id": "gen_1",  "status": "succeeded", "data": {"x": 1}, "new_field": [1, 2]}'
    result = classify(200, content, None)
    assert result.kind == "ok"
    assert result.status == "COMPLETED"
    assert result.body == content.decode()


@pytest.mark.parametrize(
    "content",
    [
        b'{"id": "gen_truncated", "status": "COMPL',
        b"",
        b"<html><body>not json</body></html>",
        b'["not", "an", "object"]',
        b"null",
        b'"COMPLETED"',
        b'{"id": "gen_1"}',
        b'{"id": "gen_1", "status": 3}',
    ],
)
def test_a_malformed_200_is_an_error_not_a_status(content: bytes) -> None:
    """A 200 without a JSON object carrying a string status is a retryable error."""
    result = classify(200, content, None)
    assert result.kind == "error"
    assert result.status is None


def test_404_is_not_found() -> None:
    """404 is classified apart, so it can be retried through the grace period."""
    body = b'{"error": "not_found", "code": "GENERATION_NOT_FOUND", "message": "x"}'
    result = classify(404, body, None)
    assert result.kind == "not_found"
    assert result.error is not None and "GENERATION_NOT_FOUND" in result.error


@pytest.mark.parametrize("code", [401, 403])
def test_401_and_403_are_unauthorized(code: int) -> None:
    """The relay's own key being refused is its own kind, not a generation error."""
    assert classify(code, b'{"error": "unauthorized"}', None).kind == "unauthorized"


def test_429_carries_retry_after_seconds() -> None:
    """429 with Retry-After in seconds (fractions too) reports the wait asked for."""
    assert classify(429, b"{}", "3").retry_after_s == pytest.approx(3.0)
    assert classify(429, b"{}", "0.5").retry_after_s == pytest.approx(0.5)
    result = classify(429, b"{}", None)
    assert result.kind == "rate_limited"
    assert result.retry_after_s is None


def test_429_carries_retry_after_as_an_http_date() -> None:
    """A Retry-After HTTP-date becomes the seconds until then."""
    when = datetime.now(UTC) + timedelta(seconds=120)
    result = classify(429, b"{}", format_datetime(when, usegmt=True))
    assert result.retry_after_s is not None
    assert 100 <= result.retry_after_s <= 121


@pytest.mark.parametrize(
    ("code", "content"),
    [
        (500, b'{"error": "internal_error", "code": "INTERNAL_ERROR", "message": "x"}'),
        (502, b"<html><h1>502 Bad Gateway</h1></html>"),
        (503, b'{"error": "service_unavailable"}'),
        (504, b""),
        (400, b'{"error": "bad"}'),
    ],
)
def test_other_statuses_are_errors_whatever_the_body(code: int, content: bytes) -> None:
    """5xx (and anything unexpected) is an error, parsed defensively, never an exception."""
    result = classify(code, content, None)
    assert result.kind == "error"
    assert result.http_status == code


def test_503_retry_after_is_honoured() -> None:
    """A 503 with Retry-After reports the wait asked for."""
    assert classify(503, b"", "5").retry_after_s == pytest.approx(5.0)


# --- poller.plan_record -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "event"),
    [
        ("COMPLETED", "generation.completed"),
        ("succeeded", "generation.completed"),
        ("FAILED", "generation.failed"),
        ("failed", "generation.failed"),
        ("CANCELED", "generation.canceled"),
        ("cancelled", "generation.canceled"),
    ],
)
def test_a_final_status_ends_polling_with_its_event(raw: str, event: str) -> None:
    """A final status stores the body as sent, stops polling and names the callback event."""
    result = ok(raw)
    record = plan_record(claimed(status="IN_PROGRESS"), result, NOW, SETTINGS, mid)
    assert record.event == event
    assert record.values["state"] == "final"
    assert record.values["result"] == result.body
    assert record.values["next_poll_at"] is None
    assert record.notice_payload is None


def test_an_unchanged_status_grows_the_gap() -> None:
    """A poll that sees the same status counts one more unchanged poll and waits longer."""
    record = plan_record(claimed(unchanged_polls=3), ok("IN_QUEUE"), NOW, SETTINGS, mid)
    assert record.event is None
    assert record.values["unchanged_polls"] == 4
    assert gap_of(record) == pytest.approx(2.0 * GROWTH**4)
    assert "state" not in record.values


def test_a_status_change_brings_the_gap_back_to_the_minimum() -> None:
    """A new status resets the unchanged count and the gap, and stamps the change."""
    record = plan_record(claimed(unchanged_polls=9), ok("IN_PROGRESS"), NOW, SETTINGS, mid)
    assert record.values["unchanged_polls"] == 0
    assert record.values["status"] == "IN_PROGRESS"
    assert record.values["status_changed_at"] == NOW
    assert gap_of(record) == pytest.approx(2.0)


def test_an_unknown_status_keeps_polling() -> None:
    """An unknown status is stored and polled again, never treated as final."""
    record = plan_record(claimed(), ok("WARMING_UP"), NOW, SETTINGS, mid)
    assert record.event is None
    assert record.values["status"] == "WARMING_UP"
    assert "state" not in record.values
    assert gap_of(record) > 0


def test_a_poll_releases_the_lease() -> None:
    """Every recorded poll gives up the lease and stamps the poll time."""
    record = plan_record(claimed(), ok("IN_QUEUE"), NOW, SETTINGS, mid)
    assert record.values["lease_owner"] is None
    assert record.values["last_polled_at"] == NOW


def test_a_success_clears_error_and_not_found_counters() -> None:
    """After errors and 404s, a good answer resets them."""
    earlier = NOW - timedelta(seconds=30)
    record = plan_record(
        claimed(error_count=5, not_found_since=earlier), ok("IN_QUEUE"), NOW, SETTINGS, mid
    )
    assert record.values["error_count"] == 0
    assert record.values["not_found_since"] is None
    assert record.values["last_error"] is None


@pytest.mark.parametrize("code", [500, 502, 503])
def test_a_server_error_backs_off_and_keeps_the_status(code: int) -> None:
    """A 5xx counts an error, backs off exponentially and leaves the last status alone."""
    result = classify(code, b"", None)
    record = plan_record(claimed(error_count=2), result, NOW, SETTINGS, mid)
    assert record.event is None
    assert record.values["error_count"] == 3
    assert "status" not in record.values
    assert gap_of(record) == pytest.approx(8.0)


def test_404_within_the_grace_keeps_polling_from_the_first_404() -> None:
    """The first 404 starts the not-found clock; the generation is polled again."""
    result = classify(404, b"", None)
    record = plan_record(claimed(), result, NOW, SETTINGS, mid)
    assert record.event is None
    assert record.values["not_found_since"] == NOW
    first = NOW - timedelta(seconds=599)
    record = plan_record(claimed(not_found_since=first), result, NOW, SETTINGS, mid)
    assert record.event is None
    assert record.values["not_found_since"] == first
    assert gap_of(record) > 0


def test_404_past_the_grace_ends_with_the_not_found_notice() -> None:
    """After RELAY_NOT_FOUND_GRACE of 404s the generation expires with a RELAY_NOT_FOUND body."""
    first = NOW - timedelta(seconds=600)
    record = plan_record(
        claimed(not_found_since=first), classify(404, b"", None), NOW, SETTINGS, mid
    )
    assert record.event == "generation.expired"
    assert record.values["state"] == "expired"
    assert record.values["next_poll_at"] is None
    assert record.notice_payload is not None
    assert record.values["result"] == record.notice_payload
    notice = orjson.loads(record.notice_payload)
    assert set(notice) == NOTICE_KEYS
    assert notice["id"] == "gen_123"
    assert notice["status"] == "FAILED"
    assert notice["input"] is None and notice["data"] is None and notice["usage"] is None
    assert notice["code"] == "RELAY_NOT_FOUND"
    assert isinstance(notice["message"], str) and notice["message"]


@pytest.mark.parametrize(
    "result",
    [
        ok("IN_PROGRESS"),
        classify(500, b"", None),
        classify(429, b"", "1"),
        classify(200, b"not json", None),
    ],
    ids=["unchanged", "error", "rate-limited", "malformed"],
)
def test_ttl_ends_with_the_expired_notice(result: PollResult) -> None:
    """Not final RELAY_GENERATION_TTL after the first subscription: a RELAY_EXPIRED notice."""
    old = claimed(status="IN_PROGRESS", first_subscribed_at=NOW - timedelta(seconds=86400))
    record = plan_record(old, result, NOW, SETTINGS, mid)
    assert record.event == "generation.expired"
    assert record.values["state"] == "expired"
    assert record.notice_payload is not None
    notice = orjson.loads(record.notice_payload)
    assert set(notice) == NOTICE_KEYS
    assert notice["id"] == "gen_123"
    assert (notice["status"], notice["code"]) == ("FAILED", "RELAY_EXPIRED")


def test_ttl_does_not_hide_a_final_result() -> None:
    """A final status seen at the TTL is delivered as final, not as expired."""
    old = claimed(first_subscribed_at=NOW - timedelta(days=3))
    assert plan_record(old, ok("COMPLETED"), NOW, SETTINGS, mid).event == "generation.completed"


def test_just_before_the_ttl_keeps_polling() -> None:
    """One second before the TTL the generation is still polled."""
    young = claimed(first_subscribed_at=NOW - timedelta(seconds=86399))
    assert plan_record(young, ok("IN_QUEUE"), NOW, SETTINGS, mid).event is None


@pytest.mark.parametrize("code", [401, 403])
def test_unauthorized_retries_slowly_and_never_ends_the_generation(code: int) -> None:
    """The relay's key being refused waits the maximum gap and fails nothing."""
    record = plan_record(
        claimed(error_count=40), classify(code, b"", None), NOW, SETTINGS, lambda: 0.0
    )
    assert record.event is None
    assert "state" not in record.values
    assert gap_of(record) == pytest.approx(SETTINGS.poll_max_interval_s)


def test_429_waits_at_least_retry_after() -> None:
    """A 429's Retry-After sets the next poll, even beyond the maximum gap."""
    record = plan_record(claimed(), classify(429, b"", "45"), NOW, SETTINGS, mid)
    assert record.event is None
    assert gap_of(record) == pytest.approx(45.0)
    record = plan_record(claimed(), classify(429, b"", "0.1"), NOW, SETTINGS, mid)
    assert gap_of(record) == pytest.approx(SETTINGS.poll_min_interval_s)


def test_429_without_retry_after_backs_off_exponentially() -> None:
    """A 429 without Retry-After backs off like any error."""
    gaps = [
        gap_of(plan_record(claimed(error_count=n), classify(429, b"", None), NOW, SETTINGS, mid))
        for n in range(4)
    ]
    assert gaps == pytest.approx([2.0, 4.0, 8.0, 16.0])


# --- Sweep cadence ---------------------------------------------------------------------------


def interval(covered: float = 0, hinted: float = 0, hinted_due: float = 0) -> float | None:
    """The cadence with the defaults: sweeps at most every 1 s, polls 2-30 s, net 300 s."""
    return sweep_interval_s(
        covered,
        hinted,
        hinted_due,
        min_interval_s=1.0,
        poll_min_interval_s=2.0,
        hinted_interval_s=300.0,
    )


def test_no_sweep_pays_below_about_eight_polled_generations() -> None:
    """A sweep must replace two per-id polls, and come at least as often as the shortest
    per-id gap: from eight generations at the defaults; never for one."""
    assert interval() is None
    assert interval(covered=1) is None
    assert interval(covered=7) is None
    assert interval(covered=8) == pytest.approx(2.0)


def test_the_sweep_cadence_speeds_up_with_the_generations_it_covers() -> None:
    """Each polled generation is budgeted a list request per SWEEP_BUDGET_GAPS shortest
    gaps, two generations' worth per sweep, never under the minimum interval."""
    assert interval(covered=10) == pytest.approx(SWEEP_REPLACES * SWEEP_BUDGET_GAPS * 2.0 / 10)
    assert interval(covered=10) == pytest.approx(1.6)
    assert interval(covered=12) == pytest.approx(16.0 / 12)
    assert interval(covered=16) == pytest.approx(1.0)
    assert interval(covered=10_000) == 1.0


def test_hint_covered_generations_are_swept_rarely_as_a_safety_net() -> None:
    """Hints detect finals; a sweep over many hinted generations catches a lost hint long
    before the per-id safety net, at a small share of a request per generation."""
    assert interval(hinted=1) is None
    assert interval(hinted=100) == pytest.approx(SWEEP_REPLACES * 3 * 300.0 / 100)
    assert interval(hinted=5) is None  # 360 s: no sooner than the per-id safety net
    assert interval(hinted_due=1) is None
    assert interval(hinted_due=3) == 1.0  # due safety polls: a sweep replaces them
    assert interval(covered=20, hinted=100) == 1.0  # the faster need wins


def test_hinted_gap_is_the_safety_interval_with_jitter() -> None:
    """The safety-net poll comes after the hinted interval, ±10%."""
    assert hinted_gap_s(300.0, mid) == pytest.approx(300.0)
    assert hinted_gap_s(300.0, constant(0.0)) == pytest.approx(270.0)
    assert hinted_gap_s(300.0, constant(1.0)) == pytest.approx(330.0)


def test_a_listed_generation_resumes_per_id_polls_at_the_gap_its_age_calls_for() -> None:
    """The polls the adaptive schedule would have made in a time, unchanged: 2, 3, 4.5 ...
    seconds apart, up to where the gap reaches its maximum."""
    assert unchanged_polls_for(0.0, 2.0, 30.0) == 0
    assert unchanged_polls_for(1.9, 2.0, 30.0) == 0
    assert unchanged_polls_for(2.0, 2.0, 30.0) == 1
    assert unchanged_polls_for(5.0, 2.0, 30.0) == 2
    assert unchanged_polls_for(9.5, 2.0, 30.0) == 3
    steps = unchanged_polls_for(10_000.0, 2.0, 30.0)
    assert poll_gap_s(steps, 2.0, 30.0, mid) == pytest.approx(30.0)
    assert poll_gap_s(steps - 1, 2.0, 30.0, mid) < 30.0


# --- poller.plan_record with push hints and sweeps ----------------------------------------


def test_a_generation_hints_reach_is_polled_only_as_a_safety_net_while_they_flow() -> None:
    """Hinted and hints flowing: the next per-id poll comes after the hinted interval; not
    hinted, or hints silent: the adaptive gap."""
    hinted = claimed(hinted_at=NOW - timedelta(seconds=5))
    settings = dataclasses.replace(SETTINGS, hinted_poll_interval_s=300.0)
    assert gap_of(plan_record(hinted, ok("IN_QUEUE"), NOW, settings, mid, True)) == 300.0
    assert gap_of(plan_record(hinted, ok("IN_QUEUE"), NOW, settings, mid, False)) == 3.0
    assert gap_of(plan_record(claimed(), ok("IN_QUEUE"), NOW, settings, mid, True)) == 3.0


def test_a_terminal_hint_the_get_does_not_confirm_yet_brings_the_next_poll_close() -> None:
    """A recent terminal hint with a GET still running: the shortest gap; an old one is
    dropped and the GET's word stands."""
    fresh = claimed(hint_status="COMPLETED", hinted_at=NOW - timedelta(seconds=1))
    record = plan_record(fresh, ok("IN_PROGRESS"), NOW, SETTINGS, mid, True)
    assert gap_of(record) == SETTINGS.poll_min_interval_s
    assert "hint_status" not in record.values
    stale = claimed(hint_status="COMPLETED", hinted_at=NOW - timedelta(seconds=600))
    record = plan_record(stale, ok("IN_PROGRESS"), NOW, SETTINGS, mid, False)
    assert record.values["hint_status"] is None
    assert record.after_terminal_hint_s == SETTINGS.poll_min_interval_s


@pytest.mark.parametrize(
    ("listing", "becomes"),
    [(Listing.MISSING, Listing.UNLISTED), (Listing.DROPPED, None)],
)
def test_a_fetch_for_absence_that_finds_it_running_sets_its_listing(
    listing: Listing, becomes: Listing | None
) -> None:
    """Missing from a complete list yet running: another workspace's (unlisted); dropped
    from a list cut short yet running: back to per-id polls."""
    record = plan_record(claimed(listing=listing), ok("IN_PROGRESS"), NOW, SETTINGS, mid)
    assert record.values["listing"] == becomes
    final = plan_record(claimed(listing=listing), ok("COMPLETED"), NOW, SETTINGS, mid)
    assert "listing" not in final.values
