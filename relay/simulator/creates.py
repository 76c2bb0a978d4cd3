"""The upstream's create surface: POST /v1/generation/{provider}/{model...}.

It must not script lifecycles (FakeUpstream draws them from the model's family) nor answer
polls.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay.simulator.answers import INVALID_BODY, as_response
from relay.simulator.families import family_for_model
from relay.simulator.model import QUEUED

if TYPE_CHECKING:
    from relay.simulator.state import FakeUpstream


def create_routes(sim: FakeUpstream) -> list[Route]:
    """The upstream's create routes, bound to `sim`."""

    async def create(request: Request) -> Response:
        # Creates get latency and the auth check; the random poll faults stay on polls.
        faults = sim.faults
        if faults.latency_s > 0:
            await asyncio.sleep(faults.latency_s)
        failure = sim.bearer.failure(request.scope["headers"], faults.auth_mode)
        if failure is not None:
            return as_response(failure)
        raw = await request.body()
        try:
            parsed: object = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            return as_response(INVALID_BODY)
        model = f"{request.path_params['provider']}/{request.path_params['model']}"
        spec = {"family": family_for_model(model), "input": parsed or None}
        gen = sim.create_checked([spec], model=model)[0]
        return Response(gen.answer(QUEUED)[2], media_type="application/json")

    return [Route("/v1/generation/{provider}/{model:path}", create, methods=["POST"])]
