"""The control API under /_fake/ (no auth): what tests and benchmarks use to script
generations, inject faults and read counters.

JSON shapes (errors are `{"error": <code>, "message": <text>}` with 400, 404 or 409):

- `POST /_fake/generations` with a spec (see `FakeUpstream.add_generation`; `family` is
  required) -> 201 `{"id", "family", "final_status", "started_at", "final_at"}` (unix seconds).
- `POST /_fake/generations/bulk` `{"items": [spec, ...]}` -> 201 `{"items": [same, ...]}`;
  all or nothing.
- `POST /_fake/generations/{id}/finish` optional `{"status": final status}` -> 200
  `{"id", "status", "final_at", "body"}`; idempotent for the same status, 409 if it is
  already final with another.
- `GET /_fake/generations/{id}/polls` -> 200 `{"id", "count", "times", "status",
  "final_at", "final_hint_at"}`; also for ids that do not exist (`status`/`final_at` null).
  `final_at` is the scheduled time, in the future while not final; `final_hint_at` when its
  terminal webhook was first answered 2xx (null if never).
- `GET /_fake/stats` -> `{"polls", "unknown_id_polls", "by_status_code": {"200": n, ...},
  "list_total", "lists_in_flight_max", "list_by_status_code": {...}, "create_total", "faults": {"hang", "error", "rate_limit",
  "malformed"}, "generations": {"total", <status>: n, ...}}`. List calls are not polls.
- `GET /_fake/creates` -> `{"total", "items": [{"id", "path", "content_type", "bytes",
  "sha256", "at", "sse", "status", "header_names"}, ...]}`: every create that passed the
  auth check, oldest first (`id` null when refused; `header_names` the request's header
  names, lower case and sorted, so tests can see what a client forwarded).
- `GET /_fake/lists` -> `{"total", "times": [unix seconds, ...], "max_in_flight"}`: every
  running-list call, and the most answered at once.
- `POST /_fake/reset` optional `{"generations": bool, "faults": bool, "webhooks": bool}` ->
  200; clears counters and stats always, releases hung polls, and optionally drops every
  generation (ending its SSE streams and every pending timer), restores the configured
  faults, or turns webhooks off.
- `GET /_fake/faults` -> the FaultSettings as JSON; `PUT /_fake/faults` with some of its
  keys -> 200 with the merged settings.
- `GET /_fake/webhooks` -> the WebhookSettings as JSON (see `webhook_settings`);
  `PUT /_fake/webhooks` with some of its keys -> 200 with the merged settings; `"url": null`
  turns them off. Stats carry `"webhooks": {"events", "sent", "delivered", "failed",
  "lost", "duplicated", "bad_signature", "filtered", "queued"}` and `"timers"` (pending).

It must not implement the upstream surface (polls, creates) nor hold state of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay.simulator.errors import (
    Conflict,
    ControlError,
    InvalidSpec,
    UnknownGeneration,
)
from relay.simulator.model import FINAL, Generation
from relay.simulator.specs import check_spec
from relay.simulator.webhook_settings import WEBHOOK_KEYS

WEBHOOK_USAGE = f"the body must be a JSON object with some of {list(WEBHOOK_KEYS)}"

if TYPE_CHECKING:
    from relay.simulator.state import FakeUpstream


def json_response(content: object, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


async def read_json(request: Request, *, empty: object = None) -> object:
    """The body as JSON (`empty` when blank); ControlError 400 when it is not JSON."""
    raw = await request.body()
    if not raw.strip():
        return empty
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ControlError(400, "invalid_json", f"body is not JSON: {exc}") from None


async def read_object(request: Request, allowed: set[str], usage: str) -> dict[str, Any]:
    """A JSON object body (empty means {}) with only `allowed` keys; InvalidSpec(usage) if not."""
    body = await read_json(request, empty={})
    if not isinstance(body, dict) or set(body) - allowed:
        raise InvalidSpec(usage)
    return body


def created_json(gen: Generation) -> dict[str, Any]:
    return {
        "id": gen.id,
        "family": gen.family,
        "final_status": gen.final_status,
        "started_at": gen.started_at,
        "final_at": gen.final_at,
    }


def control_error(request: Request, exc: Exception) -> Response:
    """The exception handler of the control API (see relay.simulator.errors)."""
    if isinstance(exc, Conflict):
        return json_response({"error": "conflict", "message": str(exc)}, 409)
    if isinstance(exc, InvalidSpec):
        return json_response({"error": "bad_request", "message": str(exc)}, 400)
    if isinstance(exc, UnknownGeneration):
        message = f"no generation {exc.args[0]!r}"
        return json_response({"error": "not_found", "message": message}, 404)
    assert isinstance(exc, ControlError)
    return json_response({"error": exc.error, "message": exc.message}, exc.status)


def control_routes(sim: FakeUpstream) -> list[Route]:
    """The /_fake/ routes, bound to `sim`."""

    async def create(request: Request) -> Response:
        spec = check_spec(await read_json(request))
        return json_response(created_json(sim.create_checked([spec])[0]), 201)

    async def bulk(request: Request) -> Response:
        body = await read_json(request)
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise InvalidSpec('the body must be {"items": [spec, ...]}')
        specs = []
        for index, item in enumerate(items):
            try:
                specs.append(check_spec(item))
            except InvalidSpec as exc:
                raise InvalidSpec(f"items[{index}]: {exc}") from None
        created = sim.create_checked(specs, bulk=True)
        return json_response({"items": [created_json(gen) for gen in created]}, 201)

    async def finish(request: Request) -> Response:
        usage = 'the body must be {"status": "COMPLETED"|"FAILED"|"CANCELED"}'
        body = await read_object(request, {"status"}, usage)
        gen = sim.finish(request.path_params["id"], body.get("status"))
        return json_response(
            {
                "id": gen.id,
                "status": gen.final_status,
                "final_at": gen.final_at,
                "body": gen.body(FINAL),
            }
        )

    async def polls(request: Request) -> Response:
        return json_response(sim.polls_json(request.path_params["id"]))

    async def stats(request: Request) -> Response:
        return json_response(sim.stats())

    async def lists(request: Request) -> Response:
        times = list(sim.list_times)
        return json_response(
            {"total": sim.list_total, "times": times, "max_in_flight": sim.lists_in_flight_max}
        )

    async def creates(request: Request) -> Response:
        items = [record.to_json() for record in sim.creates]
        return json_response({"total": len(items), "items": items})

    async def reset(request: Request) -> Response:
        flags = {"generations", "faults", "webhooks"}
        usage = 'the body must be {"generations": bool, "faults": bool, "webhooks": bool} or empty'
        body = await read_object(request, flags, usage)
        if not all(isinstance(v, bool) for v in body.values()):
            raise InvalidSpec(usage)
        sim.reset(**body)
        return json_response({"reset": {"polls": True, **{k: body.get(k, False) for k in flags}}})

    async def webhooks(request: Request) -> Response:
        if request.method == "PUT":
            sim.update_webhooks(await read_object(request, set(WEBHOOK_KEYS), WEBHOOK_USAGE))
        return json_response(sim.webhooks.settings.to_json())

    async def faults(request: Request) -> Response:
        if request.method == "PUT":
            usage = "the body must be a JSON object of fault settings"
            body = await read_json(request, empty={})
            if not isinstance(body, dict):
                raise InvalidSpec(usage)
            sim.update_faults(body)
        return json_response(sim.faults.to_json())

    return [
        Route("/_fake/generations", create, methods=["POST"]),
        Route("/_fake/generations/bulk", bulk, methods=["POST"]),
        Route("/_fake/generations/{id}/finish", finish, methods=["POST"]),
        Route("/_fake/generations/{id}/polls", polls, methods=["GET"]),
        Route("/_fake/stats", stats, methods=["GET"]),
        Route("/_fake/creates", creates, methods=["GET"]),
        Route("/_fake/lists", lists, methods=["GET"]),
        Route("/_fake/reset", reset, methods=["POST"]),
        Route("/_fake/faults", faults, methods=["GET", "PUT"]),
        Route("/_fake/webhooks", webhooks, methods=["GET", "PUT"]),
    ]
