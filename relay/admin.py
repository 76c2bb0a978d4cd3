"""The operator's HTTP side: GET /metrics (Prometheus) and GET /dashboard (the page) behind
RELAY_ADMIN_TOKEN.

Mounted only when RELAY_ADMIN_TOKEN is set (without it the paths are unknown routes: 404).
/metrics takes the token as `Authorization: Bearer`; the page takes that too, or the token
once as `?token=`: the answer is then a redirect to the page without it, setting a cookie
(HttpOnly, SameSite=Strict, path /dashboard) that holds an HMAC of the token, never the token.
Tokens and cookies are compared in constant time and never logged. These routes are not part
of the client API, so /openapi.json does not list them.

Numbers read from the database (the backlog gauges) are cached for BACKLOG_MAX_AGE_S and read
by one request at a time, so several nodes report the same cluster-wide numbers and a scrape
storm costs the database one read every few seconds. No SQL here (store.stats), and nothing of
the worker's side: counters arrive through the app's `Metrics`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from relay.cached import Cached
from relay.config import Settings
from relay.dashboard import Dashboard
from relay.database import Database
from relay.health import UpstreamHealth
from relay.http import ApiError
from relay.metrics import CONTENT_TYPE_LATEST, Metrics
from relay.signals import Signals
from relay.store import stats

logger = logging.getLogger(__name__)

BACKLOG_MAX_AGE_S = 5.0
COOKIE = "relay_admin"
COOKIE_MAX_AGE_S = 12 * 3600


@dataclass
class AdminContext:
    """What the admin routes need, built in the app's lifespan."""

    db: Database
    settings: Settings
    metrics: Metrics
    health: UpstreamHealth | None
    node: str = ""
    signals: Signals | None = None
    backlog: Cached[stats.Backlog] = field(init=False)
    dashboard: Dashboard = field(init=False)

    def __post_init__(self) -> None:
        self.backlog = Cached(lambda: stats.backlog(self.db), BACKLOG_MAX_AGE_S)
        self.dashboard = Dashboard(
            self.db, self.settings, self.metrics, self.health, self.node, self.signals
        )

    def token_matches(self, presented: str) -> bool:
        token = self.settings.admin_token
        return token is not None and hmac.compare_digest(presented.encode(), token.encode())

    def cookie_value(self) -> str:
        """What the page's cookie holds: an HMAC of the token, so the cookie is not it."""
        token = (self.settings.admin_token or "").encode()
        return hmac.new(token, b"relay dashboard cookie", hashlib.sha256).hexdigest()

    def cookie_matches(self, presented: str) -> bool:
        return self.settings.admin_token is not None and hmac.compare_digest(
            presented.encode(), self.cookie_value().encode()
        )


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
        "send the admin token as Authorization: Bearer <RELAY_ADMIN_TOKEN> (the dashboard also "
        "takes it once as ?token=)",
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


async def dashboard_page(request: Request) -> Response:
    ctx = admin_context(request)
    query = request.query_params.get("q", "")
    if "token" in request.query_params:
        if not ctx.token_matches(request.query_params["token"]):
            raise unauthorized()
        # Once: the token leaves the address bar (and the history) for a cookie.
        target = "/dashboard" + (f"?{urlencode({'q': query})}" if query else "")
        response: Response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            ctx.cookie_value(),
            max_age=COOKIE_MAX_AGE_S,
            path="/dashboard",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response
    if not (
        ctx.token_matches(bearer(request)) or ctx.cookie_matches(request.cookies.get(COOKIE, ""))
    ):
        raise unauthorized()
    nonce = secrets.token_urlsafe(16)
    page = await ctx.dashboard.render(query, nonce)
    return HTMLResponse(
        page,
        headers={
            "cache-control": "no-store",
            "content-security-policy": (
                "default-src 'none'; style-src 'unsafe-inline'; "
                f"script-src 'nonce-{nonce}'; img-src data:; form-action 'self'; "
                "base-uri 'none'; frame-ancestors 'none'"
            ),
            "referrer-policy": "no-referrer",
            "x-content-type-options": "nosniff",
        },
    )


def routes(settings: Settings) -> list[BaseRoute]:
    """The admin routes, or none when RELAY_ADMIN_TOKEN is unset (then they are 404)."""
    if settings.admin_token is None:
        return []
    return [
        Route("/metrics", metrics_page, methods=["GET"]),
        Route("/dashboard", dashboard_page, methods=["GET"]),
    ]
