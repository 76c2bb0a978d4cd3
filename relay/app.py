"""The composition root: `create_app(settings, ...)` wires every part, in the lifespan.

Shared resources (database engines, HTTP clients, the worker) are created when the app starts
and handed to routes as lifespan state, never as import-time globals. The seams tests use are
parameters here: the upstream's aiohttp connector and the callback sender.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Literal, TypedDict

import aiohttp
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from relay import api, probes
from relay.api import ApiContext
from relay.config import Settings
from relay.database import open_database
from relay.deliverer import Deliverer
from relay.guards import BodyDeadline, LastResort
from relay.health import UpstreamHealth
from relay.http import EXCEPTION_HANDLERS
from relay.ids import new_id
from relay.openapi import with_openapi
from relay.poller import Poller
from relay.resolver import IntakeResolver
from relay.sender import AiohttpSender, CallbackSender
from relay.upstream import UpstreamClient
from relay.worker import Worker

logger = logging.getLogger(__name__)

Role = Literal["all", "api", "worker"]


class State(TypedDict):
    api: ApiContext


def create_app(
    settings: Settings,
    *,
    role: Role = "all",
    upstream_connector: aiohttp.BaseConnector | None = None,
    sender: CallbackSender | None = None,
    intake_resolver: IntakeResolver | None = None,
) -> Starlette:
    """The relay as an ASGI app; migrations must already be applied (the CLI does it)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        db = open_database(settings.database_url, secret_key=settings.secret_key)
        await db.sync_clock()
        owner = new_id("node")
        worker: Worker | None = None
        health: UpstreamHealth | None = None
        upstream: UpstreamClient | None = None
        callback_sender: CallbackSender | None = None
        if role in ("all", "worker"):
            health = UpstreamHealth()
            upstream = UpstreamClient(
                settings.upstream_url,
                settings.upstream_api_key,
                timeout_s=settings.upstream_timeout_s,
                max_connections=settings.poll_concurrency,
                max_body_bytes=settings.upstream_max_body_bytes,
                connector=upstream_connector,
            )
            callback_sender = sender or AiohttpSender(
                allow_private=settings.allow_private_callbacks,
                limit=settings.delivery_concurrency,
                limit_per_host=settings.delivery_per_host,
            )
            deliverer = Deliverer(db, settings, callback_sender, owner)
            poller = Poller(
                db,
                settings,
                upstream,
                owner,
                health=health,
                on_deliveries_queued=lambda: worker.kick_deliverer() if worker else None,
            )
            worker = Worker(db, settings, poller, deliverer)
            worker.start()
        intake = intake_resolver or IntakeResolver()
        context = ApiContext(db=db, settings=settings, health=health, intake=intake)
        if worker is not None:
            context.on_polls_queued = worker.kick_poller
            context.on_deliveries_queued = worker.kick_deliverer
        logger.info("relay started: role=%s node=%s", role, owner)
        try:
            yield {"api": context}
        finally:
            await context.creates.drain()
            if worker is not None:
                await worker.stop()
            if upstream is not None:
                await upstream.aclose()
            if callback_sender is not None:
                await callback_sender.aclose()
            await intake.close()
            await db.dispose()
            logger.info("relay stopped: node=%s", owner)

    # A worker serves only the probes; /openapi.json documents what this process serves.
    routes: list[BaseRoute] = [*(api.ROUTES if role != "worker" else ()), *probes.ROUTES]
    return Starlette(
        routes=with_openapi(routes),
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[
            Middleware(LastResort),
            Middleware(BodyDeadline, timeout_s=settings.body_timeout_s),
        ],
    )
