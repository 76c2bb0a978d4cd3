"""The composition root: `create_app(settings, ...)` wires every part, in the lifespan.

Shared resources (database engines, HTTP clients, the worker) are created when the app starts
and handed to routes as lifespan state, never as import-time globals. The seams tests use are
parameters here: the upstream's aiohttp connector and the callback sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal, TypedDict

import aiohttp
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from relay import __version__, admin, api, logs, probes, proxy, store
from relay import intake as intake_routes
from relay.admin import AdminContext
from relay.api import ApiContext
from relay.config import Settings
from relay.creator import Creator, UpstreamCreator
from relay.database import Database, open_database
from relay.deliverer import Deliverer
from relay.guards import Guard
from relay.health import UpstreamHealth
from relay.http import EXCEPTION_HANDLERS
from relay.idempotency import IdempotencyGate
from relay.ids import new_id
from relay.intake import IntakeContext
from relay.metrics import Metrics
from relay.openapi import with_openapi
from relay.poller import Poller, upstream_budget
from relay.proxy import ProxyContext
from relay.resolver import IntakeResolver
from relay.sender import AiohttpSender, CallbackSender
from relay.signals import Signals
from relay.ssecreate import SseCreator
from relay.streams import StreamFollower
from relay.sweeps import Sweeper
from relay.upstream import UpstreamClient
from relay.worker import Worker

logger = logging.getLogger(__name__)

Role = Literal["all", "api", "worker"]


class State(TypedDict):
    api: ApiContext
    intake: IntakeContext
    admin: AdminContext
    proxy: ProxyContext


def _resume_normal_polling(
    db: Database, settings: Settings, worker: Worker
) -> Callable[[], Awaitable[None]]:
    """What a worker does when push hints go silent: safety-net polls come forward at once."""

    async def resume() -> None:
        resumed = await store.end_safety_net(db, settings.poll_max_interval_s)
        if resumed:
            logger.info("%d generations are back on the normal polling schedule", resumed)
            worker.kick_poller()

    return resume


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
        logs.bind_node(owner)
        # Collected only when an operator can read them (admin.py serves them with the token).
        metrics = Metrics(enabled=settings.admin_token is not None, version=__version__)
        signals = Signals(db, settings)
        await signals.try_refresh()
        watching = asyncio.create_task(signals.run())
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
            deliverer = Deliverer(db, settings, callback_sender, owner, metrics=metrics)
            budget = upstream_budget(settings)
            poller = Poller(
                db,
                settings,
                upstream,
                owner,
                health=health,
                signals=signals,
                budget=budget,
                metrics=metrics,
                on_deliveries_queued=lambda: worker.kick_deliverer() if worker else None,
            )
            sweeper = None
            if settings.sweep != "off":
                sweeper = Sweeper(
                    db,
                    settings,
                    upstream,
                    budget,
                    signals,
                    health,
                    owner,
                    metrics=metrics,
                    on_polls_queued=lambda: worker.kick_poller() if worker else None,
                )
            worker = Worker(db, settings, poller, deliverer, sweeper)
            signals.on_silence.append(_resume_normal_polling(db, settings, worker))
            worker.start()
        resolver = intake_resolver or IntakeResolver()
        context = ApiContext(
            db=db, settings=settings, health=health, intake=resolver, signals=signals
        )
        intake = IntakeContext(db=db, settings=settings, signals=signals, metrics=metrics)
        if worker is not None:
            context.on_polls_queued = worker.kick_poller
            context.on_deliveries_queued = worker.kick_deliverer
            intake.on_polls_queued = worker.kick_poller
        creator: Creator = (SseCreator if settings.upstream_sse else UpstreamCreator)(
            settings.upstream_url,
            settings.upstream_api_key,
            timeout_s=settings.upstream_timeout_s,
        )
        gate = IdempotencyGate(db, owner, settings.lease_s)
        proxy_context = ProxyContext(api=context, creator=creator, gate=gate)
        follower: StreamFollower | None = None
        if settings.upstream_sse and role != "worker":
            # Named apart from this node's poller, whose leases are another matter.
            follower = StreamFollower(db, f"{owner}/sse", settings.lease_s, context.on_polls_queued)
            proxy_context.follow = follower.follow
            proxy_context.stream_owner = follower.owner
        logger.info("relay started: role=%s node=%s", role, owner, extra={"event": "relay.started"})
        try:
            yield {
                "api": context,
                "intake": intake,
                "admin": AdminContext(db, settings, metrics, health, owner, signals),
                "proxy": proxy_context,
            }
        finally:
            watching.cancel()
            await context.creates.drain()
            await intake.hints.drain()
            if follower is not None:
                await follower.close()
            await creator.aclose()
            if worker is not None:
                await worker.stop()
            if upstream is not None:
                await upstream.aclose()
            if callback_sender is not None:
                await callback_sender.aclose()
            await resolver.close()
            await db.dispose()
            logger.info("relay stopped: node=%s", owner, extra={"event": "relay.stopped"})

    # A worker serves only the probes; /openapi.json documents what this process serves.
    served = [*api.ROUTES, *intake_routes.ROUTES, *proxy.ROUTES] if role != "worker" else []
    routes: list[BaseRoute] = [*served, *probes.ROUTES]
    # The operator's routes are not the client API's: /openapi.json does not list them.
    return Starlette(
        routes=[*with_openapi(routes), *admin.routes(settings)],
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[Middleware(Guard, body_timeout_s=settings.body_timeout_s)],
    )
