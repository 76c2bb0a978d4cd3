"""The simulator's Starlette app: the upstream surface (fast GET path, creates) in front of
the control API under /_fake/.

It wires routes, middleware and exception handlers only; behaviour lives in the modules the
routes come from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from starlette.applications import Starlette
from starlette.middleware import Middleware

from relay.simulator.config import FakeUpstreamConfig
from relay.simulator.control import control_error, control_routes
from relay.simulator.creates import create_routes
from relay.simulator.errors import ControlError, InvalidSpec, UnknownGeneration
from relay.simulator.polls import UpstreamFastPath

if TYPE_CHECKING:
    from relay.simulator.state import FakeUpstream

MAX_BODY_BYTES: Final = 64 * 1024 * 1024  # bulk creation of 100,000 items fits


def build_app(sim: FakeUpstream) -> Starlette:
    """The app serving `sim`; `app.state.fake_upstream` is `sim`."""
    app = Starlette(
        # GET /v1/generation/{id} is answered by UpstreamFastPath before routing.
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
