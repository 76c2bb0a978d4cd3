"""Push-hint payloads: where the id and state are read from, and how hints rank."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from relay import store
from relay.database import Database
from relay.hints import Hint, parse_hint
from relay.statuses import status_rank


@pytest.mark.parametrize(
    "payload",
    [
        {"prediction": {"id": "gen_1"}},
        {"data": {"prediction": {"id": "gen_1"}}},
        {"data": {"id": "gen_1"}},
        {"id": "gen_1"},
        {"task_id": "gen_1"},
        {"data": {"task_id": "gen_1"}},
    ],
)
def test_the_id_is_found_at_every_place_the_contract_names(payload: dict[str, Any]) -> None:
    """Each of the six id locations yields the generation id."""
    hint = parse_hint(payload)
    assert hint is not None and hint.generation_id == "gen_1"


def test_the_first_string_in_contract_order_wins() -> None:
    """prediction.id beats a top-level id (which may be the event's own id)."""
    payload = {"id": "evt_9", "prediction": {"id": "gen_1"}, "task_id": "gen_2"}
    assert parse_hint(payload) == Hint("gen_1", None)


def test_a_non_string_id_is_skipped_for_the_next_place() -> None:
    """A number at prediction.id is not an id; data.id is used instead."""
    assert parse_hint({"prediction": {"id": 12}, "data": {"id": "gen_1"}}) == Hint("gen_1", None)


@pytest.mark.parametrize(
    "payload",
    [
        {},
        [],
        "gen_1",
        None,
        {"prediction": {"state": "succeeded"}},
        {"id": ".."},
        {"id": "."},
        {"id": "a/b"},
        {"id": ""},
        {"id": "x" * 129},
    ],
)
def test_no_valid_id_is_no_hint(payload: Any) -> None:
    """Payloads without an id the contract's rule accepts are ignored."""
    assert parse_hint(payload) is None


@pytest.mark.parametrize(
    ("state", "status"),
    [
        ("queued", "IN_QUEUE"),
        ("running", "IN_PROGRESS"),
        ("succeeded", "COMPLETED"),
        ("failed", "FAILED"),
        ("canceled", "CANCELED"),
        ("CANCELLED", "CANCELED"),
    ],
)
def test_prediction_state_maps_to_the_upstream_status(state: str, status: str) -> None:
    """prediction.state words map to the poll API's statuses."""
    hint = parse_hint({"prediction": {"id": "g", "state": state}})
    assert hint is not None and hint.status == status


def test_state_is_preferred_to_status_and_status_to_the_event_type() -> None:
    """prediction.state, else prediction.status, else the event name."""
    both = {"type": "task.started", "prediction": {"id": "g", "state": "failed", "status": "x"}}
    assert parse_hint(both) == Hint("g", "FAILED")
    status_only = {"type": "task.started", "prediction": {"id": "g", "status": "succeeded"}}
    assert parse_hint(status_only) == Hint("g", "COMPLETED")
    event_only = {"type": "task.canceled", "data": {"id": "g"}}
    assert parse_hint(event_only) == Hint("g", "CANCELED")


def test_the_state_is_read_from_a_nested_prediction_too() -> None:
    """When the prediction sits under data, its state is read there."""
    payload = {"type": "task.created", "data": {"prediction": {"id": "g", "state": "running"}}}
    assert parse_hint(payload) == Hint("g", "IN_PROGRESS")


def test_an_unknown_state_is_a_hint_without_status() -> None:
    """An id with an unknown state is a hint that says nothing of progress."""
    hint = parse_hint({"type": "task.exploded", "prediction": {"id": "g", "state": "weird"}})
    assert hint == Hint("g", None)
    assert hint is not None and not hint.terminal and hint.rank == 0


@pytest.mark.parametrize(
    ("event", "terminal"),
    [
        ("task.created", False),
        ("task.started", False),
        ("task.completed", True),
        ("task.failed", True),
        ("task.canceled", True),
    ],
)
def test_only_final_events_are_terminal(event: str, terminal: bool) -> None:
    """completed, failed and canceled are terminal; created and started are not."""
    hint = parse_hint({"type": event, "task_id": "g"})
    assert hint is not None and hint.terminal is terminal


def test_ranks_order_queued_running_final() -> None:
    """A later stage ranks higher, so a late 'created' cannot undo a 'started'."""
    assert status_rank(None) == 0
    assert status_rank("SOMETHING_NEW") == 0
    assert status_rank("IN_QUEUE") < status_rank("IN_PROGRESS") < status_rank("COMPLETED")
    assert status_rank("FAILED") == status_rank("CANCELED") == status_rank("COMPLETED")


# --- Applying a batch in the store, on both databases ------------------------------------------


async def test_a_batch_accepts_each_webhook_id_once(db: Database) -> None:
    """One transaction for many hints: a webhook-id seen before, or twice in the batch, is a
    duplicate; the others are taken (remembered, for ids nobody watches yet)."""
    soon = db.now() + timedelta(seconds=300)

    def hint(webhook_id: str, gen_id: str) -> store.IncomingHint:
        return store.IncomingHint(webhook_id, gen_id, "running", soon)

    first = await store.apply_hints(db, [hint("msg_b", "gen_b")])
    assert first == [store.HintOutcome.REMEMBERED]
    outcomes = await store.apply_hints(
        db,
        [
            hint("msg_a", "gen_a"),
            hint("msg_b", "gen_b"),
            hint("msg_a", "gen_a"),
            hint("msg_c", "gen_c"),
        ],
    )
    assert outcomes == [
        store.HintOutcome.REMEMBERED,
        store.HintOutcome.DUPLICATE,
        store.HintOutcome.DUPLICATE,
        store.HintOutcome.REMEMBERED,
    ]
