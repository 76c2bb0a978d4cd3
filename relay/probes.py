"""Liveness and readiness: /healthz and /readyz, served by every role, without a key.

Readiness is whether the database answers, plus how the last upstream requests went (as the
worker's UpstreamHealth saw them; "unknown" where no worker runs) and whether push hints
flow (signals.py). Nothing else here.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from relay.api import context
from relay.http import Answer, Operation, endpoint, json_response, route
from relay.schemas import Health, Readiness


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    ctx = context(request)
    database_ok = await ctx.db.ping()
    body = {
        "database": "ok" if database_ok else "unavailable",
        "upstream": ctx.health.state if ctx.health is not None else "unknown",
        "hints": ctx.signals.hints_state() if ctx.signals is not None else "off",
    }
    return json_response(body, 200 if database_ok else 503)


HEALTH = Operation("getHealth", "Liveness", {200: Answer("running", Health)}, authenticated=False)
READINESS = Operation(
    "getReadiness",
    "Readiness: the database answers; how the last upstream requests went; push hints",
    {
        200: Answer("ready", Readiness),
        503: Answer("the database does not answer", Readiness),
    },
    authenticated=False,
)

ROUTES = [
    route("/healthz", GET=endpoint(HEALTH, healthz)),
    route("/readyz", GET=endpoint(READINESS, readyz)),
]
