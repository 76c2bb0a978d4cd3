"""Push hints: what one of the upstream's workspace webhooks says about a generation (pure).

skills.video can POST its own webhooks (`task.created`, `task.started`, `task.completed`,
`task.failed`, `task.canceled`) to the relay. Their payload beyond the state is UNKNOWN, so the
contract fixes where to look: the generation id is the first string at `prediction.id`,
`data.prediction.id`, `data.id`, `id`, `task_id`, `data.task_id`; the state is
`prediction.state`, else `prediction.status`, else the event name in `type`.

A hint is advice, never the result: a terminal hint makes the relay fetch the generation at
once, and the callback body is always that GET's body. Hints arrive at least once and out of
order, so they carry a rank (statuses.status_rank): a hint never moves a generation back.

This module parses and ranks; it must not do I/O (the store applies hints, intake.py verifies
and answers the request).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relay.schemas import is_generation_id
from relay.statuses import FINAL_STATUSES, normalize_status, status_rank

# Where the id may be, in the contract's order.
ID_PATHS: tuple[tuple[str, ...], ...] = (
    ("prediction", "id"),
    ("data", "prediction", "id"),
    ("data", "id"),
    ("id",),
    ("task_id",),
    ("data", "task_id"),
)
_STATE_WORDS = {
    "queued": "IN_QUEUE",
    "running": "IN_PROGRESS",
    "succeeded": "COMPLETED",
    "failed": "FAILED",
    "canceled": "CANCELED",
    "cancelled": "CANCELED",
}
_EVENT_STATUSES = {
    "task.created": "IN_QUEUE",
    "task.started": "IN_PROGRESS",
    "task.completed": "COMPLETED",
    "task.failed": "FAILED",
    "task.canceled": "CANCELED",
    "task.cancelled": "CANCELED",
}


@dataclass(frozen=True, slots=True)
class Hint:
    """What a webhook says: a generation and, when the payload names a known state, its
    status in the upstream's vocabulary (IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELED)."""

    generation_id: str
    status: str | None

    @property
    def terminal(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def rank(self) -> int:
        return status_rank(self.status)


def parse_hint(payload: object) -> Hint | None:
    """The hint in a webhook payload, or None when it names no valid generation id."""
    if not isinstance(payload, Mapping):
        return None
    generation_id = _first_string(payload)
    if generation_id is None or not is_generation_id(generation_id):
        return None
    return Hint(generation_id, _status(payload))


def _first_string(payload: Mapping[str, Any]) -> str | None:
    for path in ID_PATHS:
        value = _at(payload, path)
        if isinstance(value, str):
            return value
    return None


def _at(payload: Mapping[str, Any], path: tuple[str, ...]) -> object:
    value: object = payload
    for name in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(name)
    return value


def _status(payload: Mapping[str, Any]) -> str | None:
    prediction = payload.get("prediction")
    if not isinstance(prediction, Mapping):
        prediction = _at(payload, ("data", "prediction"))
    if isinstance(prediction, Mapping):
        state = prediction.get("state")
        if isinstance(state, str) and state.strip().lower() in _STATE_WORDS:
            return _STATE_WORDS[state.strip().lower()]
        status = prediction.get("status")
        if isinstance(status, str) and status.strip():
            normalized = normalize_status(status)
            if status_rank(normalized) > 0:
                return normalized
    event = payload.get("type")
    if isinstance(event, str):
        return _EVENT_STATUSES.get(event.strip().lower())
    return None
