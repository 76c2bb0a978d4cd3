"""The operator's HTTP side: GET /metrics (Prometheus) behind RELAY_ADMIN_TOKEN.

Mounted only when RELAY_ADMIN_TOKEN is set (without it the paths are unknown routes: 404).
The token is compared in constant time and never logged. These routes are not part of the
client API, so /openapi.json does not list them.

Numbers read from the database (the backlog gauges) are cached for BACKLOG_MAX_AGE_S and read
by one request at a time, so several nodes report the same cluster-wide numbers and a scrape
storm costs the database one read every few seconds. No SQL here (store.stats), and nothing of
the worker's side: counters arrive through the app's `Metrics`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from relay.config import Settings
from relay.database import Database
from relay.health import UpstreamHealth
from relay.http import ApiError
from relay.metrics import CONTENT_TYPE_LATEST, Metrics
from relay.store import stats

logger = logging.getLogger(__name__)

T = TypeVar("T")

BACKLOG_MAX_AGE_S = 5.0
READ_TIMEOUT_S = 3.0  # a scrape answers with the process's counters even if the database hangs


class Cached(Generic[T]):
    """The answer of `read`, read again at most every `max_age_s`, by one caller at a time
    (the others wait for that read). A failed read is remembered as None for as long, so a
    database that is down is not asked by every request."""

    def __init__(self, read: Callable[[], Awaitable[T]], max_age_s: float) -> None:
        self._read = read
        self._max_age_s = max_age_s
        self._value: T | None = None
        self._read_at: float | None = None
        self._lock = asyncio.Lock()

    def _fresh(self) -> bool:
        return self._read_at is not None and time.monotonic() - self._read_at < self._max_age_s

    async def get(self) -> T | None:
        if self._fresh():
            return self._value
        async with self._lock:
            if not self._fresh():
                try:
                    async with asyncio.timeout(READ_TIMEOUT_S):
                        self._value = await self._read()
                except Exception as exc:
                    # The database's outage is reported where it is seen (outages.py).
                    logger.debug("admin read failed: %s", type(exc).__name__)
                    self._value = None
                self._read_at = time.monotonic()
            return self._value


@dataclass
class AdminContext:
    """What the admin routes need, built in the app's lifespan."""

    db: Database
    settings: Settings
    metrics: Metrics
    health: UpstreamHealth | None
    backlog: Cached[stats.Backlog] = field(init=False)

    def __post_init__(self) -> None:
        self.backlog = Cached(lambda: stats.backlog(self.db), BACKLOG_MAX_AGE_S)

    def token_matches(self, presented: str) -> bool:
        token = self.settings.admin_token
        return token is not None and hmac.compare_digest(presented.encode(), token.encode())


def admin_context(request: Request) -> AdminContext:
    ctx: AdminContext = request.state.admin
    return ctx


def bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        "send the admin token as Authorization: Bearer <RELAY_ADMIN_TOKEN>",
        headers={"www-authenticate": 'Bearer realm="relay admin"'},
    )


async def metrics_page(request: Request) -> Response:
    ctx = admin_context(request)
    if not ctx.token_matches(bearer(request)):
        raise unauthorized()
    backlog = await ctx.backlog.get()
    ctx.metrics.set_database_up(backlog is not None)
    if backlog is not None:
        ctx.metrics.set_backlog(
            backlog.pending_generations,
            backlog.pending_deliveries,
            backlog.oldest_age_s(ctx.db.now()),
        )
    ctx.metrics.set_upstream_state(ctx.health.state if ctx.health is not None else "unknown")
    return Response(
        ctx.metrics.exposition(),
        media_type=CONTENT_TYPE_LATEST,
        headers={"cache-control": "no-store"},
    )


def routes(settings: Settings) -> list[BaseRoute]:
    """The admin routes, or none when RELAY_ADMIN_TOKEN is unset (then they are 404)."""
    if settings.admin_token is None:
        return []
    return [Route("/metrics", metrics_page, methods=["GET"])]
