"""The running list's answers, classified: what a sweep may conclude from each."""

from __future__ import annotations

import orjson
import pytest

from relay.upstream import Listed, classify_list


def _items(count: int) -> bytes:
    return orjson.dumps(
        [
            {"id": f"gen_{i}", "status": "IN_PROGRESS", "usage": {}, "input": {}}
            for i in range(count)
        ]
    )


def test_fewer_items_than_the_limit_is_a_complete_list() -> None:
    """An answer shorter than limit proves what is absent from it is not running."""
    answer = classify_list(200, _items(3), None, limit=100)
    assert answer.kind == "ok" and answer.complete
    assert answer.items[0] == Listed("gen_0", "IN_PROGRESS")


def test_a_full_list_proves_only_presence() -> None:
    """An answer of exactly limit items may have been cut short."""
    answer = classify_list(200, _items(100), None, limit=100)
    assert answer.kind == "ok" and not answer.complete and len(answer.items) == 100


def test_statuses_are_normalised_and_bad_items_skipped_but_counted() -> None:
    """Legacy words map to the current vocabulary; malformed items are skipped, and they
    still count toward the limit, so a list they fill is not taken as complete."""
    body = orjson.dumps(
        [
            {"id": "gen_a", "status": "processing"},
            {"id": "gen_b", "status": "starting"},
            {"id": 5, "status": "IN_QUEUE"},
            {"id": "..", "status": "IN_QUEUE"},
            {"id": "gen_c"},
            "gen_d",
        ]
    )
    answer = classify_list(200, body, None, limit=6)
    assert answer.items == (Listed("gen_a", "IN_PROGRESS"), Listed("gen_b", "IN_QUEUE"))
    assert not answer.complete


def test_an_envelope_around_the_array_is_tolerated() -> None:
    """{"data": [...]} is read like the documented bare array."""
    answer = classify_list(200, b'{"data": [{"id": "g", "status": "IN_QUEUE"}]}', None, 50)
    assert answer.kind == "ok" and answer.items == (Listed("g", "IN_QUEUE"),) and answer.complete


@pytest.mark.parametrize("body", [b"not json", b'"text"', b"{}", b"null", b'{"data": 3}'])
def test_a_body_that_is_no_list_is_an_error(body: bytes) -> None:
    """An unreadable 200 proves nothing."""
    assert classify_list(200, body, None, 50).kind == "error"


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (404, "unsupported"),
        (405, "unsupported"),
        (501, "unsupported"),
        (401, "unauthorized"),
        (403, "unauthorized"),
        (429, "rate_limited"),
        (500, "error"),
        (502, "error"),
        (503, "error"),
    ],
)
def test_error_answers_are_classified(status: int, kind: str) -> None:
    """404/405/501 mean the upstream has no running list; others are passing troubles."""
    answer = classify_list(status, b'{"code": "X"}', "2", 50)
    assert answer.kind == kind and not answer.items and answer.http_status == status
    if status in (429, 503):
        assert answer.retry_after_s == 2.0
