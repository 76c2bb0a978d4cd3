"""The simulator's Starlette app: the upstream surface (fast GET path, creates) in front of
the control API under /_fake/.

It wires routes, middleware and exception handlers only; behaviour lives in the modules the
routes come from.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from relay.simulator.config import FakeUpstreamConfig
from relay.simulator.control import control_error, control_routes
from relay.simulator.creates import create_routes
from relay.simulator.errors import ControlError, InvalidSpec, UnknownGeneration
from relay.simulator.polls import POLL_PREFIX, poll
from relay.simulator.running import RUNNING_PATH, list_running

if TYPE_CHECKING:
    from relay.simulator.state import FakeUpstream

MAX_BODY_BYTES: Final = 64 * 1024 * 1024  # bulk creation of 100,000 items fits


class UpstreamFastPath:
    """Answers the upstream's GETs (polls, the running list) ahead of Starlette's router.

    A middleware rather than Routes so a poll, the benchmarks' hot path, costs no routing,
    Request or Response objects; it still sits inside Starlette's ServerErrorMiddleware.
    """

    __slots__ = ("app", "sim")

    def __init__(self, app: ASGIApp, sim: FakeUpstream) -> None:
        self.app = app
        self.sim = sim

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            path: str = scope["path"]
            if path.startswith(POLL_PREFIX):
                gen_id = path[len(POLL_PREFIX) :]
                if gen_id and "/" not in gen_id:
                    await poll(self.sim, gen_id, scope, receive, send)
                    return
            elif path == RUNNING_PATH:
                await list_running(self.sim, scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(sim: FakeUpstream) -> Starlette:
    """The app serving `sim`; `app.state.fake_upstream` is `sim`."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sim.timers.start()
        try:
            yield
        finally:
            await sim.webhooks.close()
            await sim.timers.stop()

    app = Starlette(
        lifespan=lifespan,
        # GET /v1/generation/{id} and /v1/generations/running: UpstreamFastPath, before routing.
        routes=[*create_routes(sim), *control_routes(sim)],
        exception_handlers={
            InvalidSpec: control_error,
            UnknownGeneration: control_error,
            ControlError: control_error,
        },
        middleware=[Middleware(UpstreamFastPath, sim=sim)],
        max_body_size=MAX_BODY_BYTES,
    )
    app.state.fake_upstream = sim
    return app


def create_fake_upstream(config: FakeUpstreamConfig | None = None) -> Starlette:
    """A new simulator app; its state is `app.state.fake_upstream` (a FakeUpstream)."""
    from relay.simulator.state import FakeUpstream

    return FakeUpstream(config).app
