"""GET /v1/generations/running?limit=N: the workspace's queued and running generations,
newest first, as a JSON array of `{id, status, usage, input}`.

RunningIndex keeps own-workspace generations in creation order (a dict, so newest first is a
reversed walk) and drops each one the first time a walk finds it final: final is for good,
so a call costs its `limit` plus the generations it retires, never a sort of everything
held. It must not count polls: a list call is counted apart (`list_total`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qs

import orjson
from starlette.types import Receive, Scope, Send

from relay.simulator.answers import Answer, answer, error_answer, send_answer
from relay.simulator.families import LEGACY_STATUS
from relay.simulator.model import FINAL, Generation
from relay.simulator.polls import request_faults

if TYPE_CHECKING:
    from relay.simulator.state import FakeUpstream

RUNNING_PATH: Final = "/v1/generations/running"
DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 100
_BAD_LIMIT: Final = error_answer(
    400, "invalid_input", "INVALID_INPUT", f"limit must be an integer from 1 to {MAX_LIMIT}."
)
# What an upstream without the endpoint might answer (the running_list_status switch).
_MISSING: Final[dict[int, Answer]] = {
    404: error_answer(404, "not_found", "NOT_FOUND", "Not found."),
    405: error_answer(405, "method_not_allowed", "METHOD_NOT_ALLOWED", "Method not allowed."),
    501: error_answer(501, "not_implemented", "NOT_IMPLEMENTED", "Not implemented."),
}


class RunningIndex:
    """Own-workspace generations not yet seen final, oldest first."""

    __slots__ = ("_live",)

    def __init__(self) -> None:
        self._live: dict[str, Generation] = {}

    def __len__(self) -> int:
        return len(self._live)

    def add(self, gen: Generation) -> None:
        if not gen.other_workspace:
            self._live[gen.id] = gen

    def clear(self) -> None:
        self._live.clear()

    def newest(self, limit: int, now_mono: float) -> list[Generation]:
        """Up to `limit` visible, non-final generations, newest first; retires final ones."""
        found: list[Generation] = []
        retired: list[str] = []
        for gen in reversed(self._live.values()):
            if gen.phase_at(now_mono) == FINAL:
                retired.append(gen.id)
            elif now_mono >= gen.not_found_until_mono:
                found.append(gen)
                if len(found) == limit:
                    break
        for gen_id in retired:
            del self._live[gen_id]
        return found


def _parse_limit(query_string: bytes) -> int | None:
    values = parse_qs(query_string.decode("latin-1")).get("limit")
    if not values:
        return DEFAULT_LIMIT
    raw = values[-1].strip()
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        return None
    return int(raw)


def _item(gen: Generation, now_mono: float) -> dict[str, object]:
    status = gen.status_at(now_mono)
    return {
        "id": gen.id,
        "status": LEGACY_STATUS[status] if gen.legacy_status else status,
        "usage": gen.usage(status),
        "input": gen.input,
    }


async def list_running(sim: FakeUpstream, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer GET /v1/generations/running: the switch, then faults and auth, then the list.
    Calls in flight at once are counted (`lists_in_flight_max`): clients that must not
    overlap their calls can be checked."""
    sim.list_total += 1
    sim.list_times.append(time.time())
    sim.lists_in_flight += 1
    sim.lists_in_flight_max = max(sim.lists_in_flight_max, sim.lists_in_flight)
    try:
        prepared = await _prepare(sim, scope, receive)
    finally:
        sim.lists_in_flight -= 1
    codes = sim.list_by_status_code
    codes[prepared[0]] = codes.get(prepared[0], 0) + 1
    await send_answer(send, prepared)


async def _prepare(sim: FakeUpstream, scope: Scope, receive: Receive) -> Answer:
    faults = sim.faults
    prepared = _MISSING.get(faults.running_list_status or 0)
    if prepared is None:
        prepared = await request_faults(sim, faults, scope, receive)
    if prepared is not None:
        return prepared
    limit = _parse_limit(scope["query_string"])
    if limit is None:
        return _BAD_LIMIT
    now = time.monotonic()
    items = [_item(gen, now) for gen in sim.running.newest(limit, now)]
    return answer(200, orjson.dumps(items))
