"""The dashboard page: what it shows and how, rendered on the server.

Numbers come from store.stats (cluster-wide, cached for PAGE_MAX_AGE_S), the search from
store.inspect, and this process's counters from `Metrics`; the page is the Jinja2 template
relay/templates/dashboard.html with autoescape on, so every value from the database is escaped.
No build step and nothing fetched by the browser: CSS inline, the chart an inline SVG drawn
here, a few lines of inline JS (allowed by a per-page nonce) to refresh it. Callback URLs are
shown without query string, fragment or user:password, and every error text goes through the
logs' redaction. Read-only: nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jinja2

from relay import __version__
from relay.cached import Cached
from relay.config import Settings
from relay.database import Database
from relay.health import UpstreamHealth
from relay.logs import Redactor, shown_url
from relay.metrics import Metrics
from relay.signals import Signals
from relay.store import inspect, stats

PAGE_MAX_AGE_S = 5.0
REFRESH_S = 10
CHART_MINUTES = 60
CHART_HEIGHT_PX = 120

_redact = Redactor()


def shown_text(text: str | None, limit: int = 300) -> str:
    """An error or an answer's excerpt as the page shows it: redacted, one line, short."""
    if not text:
        return ""
    flat = " ".join(_redact(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def ago(then: datetime | None, now: datetime) -> str:
    if then is None:
        return ""
    seconds = max(0.0, (now - then).total_seconds())
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} days ago"


def utc(then: datetime | None) -> str:
    return "" if then is None else then.strftime("%Y-%m-%d %H:%M:%SZ")


def _floor_minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


class MinuteChart:
    """Callbacks delivered and failed per minute over the last hour. Minutes that can no longer
    change are kept, so each read asks the database only for the last few minutes."""

    def __init__(self, db: Database, settle_s: float) -> None:
        self._db = db
        self._settle = timedelta(seconds=settle_s)  # an attempt is recorded after it ends
        self._minutes: dict[datetime, tuple[int, int]] = {}
        self._settled_before: datetime | None = None

    async def read(self) -> list[tuple[datetime, int, int]]:
        now = self._db.now()
        first = _floor_minute(now) - timedelta(minutes=CHART_MINUTES - 1)
        since = first
        if self._settled_before is not None and self._settled_before > first:
            since = self._settled_before
        fresh = await stats.attempts_per_minute(self._db, since)
        self._minutes = {m: c for m, c in self._minutes.items() if first <= m < since}
        self._minutes.update(fresh)
        self._settled_before = _floor_minute(now - self._settle)
        return [
            (minute, *self._minutes.get(minute, (0, 0)))
            for minute in (first + timedelta(minutes=i) for i in range(CHART_MINUTES))
        ]


@dataclass(frozen=True)
class Bar:
    x: int
    delivered_px: int
    failed_px: int
    label: str


def chart_bars(minutes: list[tuple[datetime, int, int]]) -> tuple[list[Bar], int]:
    """The chart's bars (stacked: delivered below, failed above) and the scale's top."""
    top = max([delivered + failed for _, delivered, failed in minutes] + [1])
    bars = []
    for i, (minute, delivered, failed) in enumerate(minutes):
        bars.append(
            Bar(
                x=i * 10,
                delivered_px=round(delivered * CHART_HEIGHT_PX / top),
                failed_px=round(failed * CHART_HEIGHT_PX / top),
                label=f"{minute:%H:%M}Z: {delivered} delivered, {failed} failed",
            )
        )
    return bars, top


def timeline(found: inspect.Found, sub_id: str) -> list[dict[str, Any]]:
    """One subscription's history, oldest first: created, each delivery queued, each attempt,
    the next attempt when one is scheduled, delivered."""
    sub = next(s for s in found.subscriptions if s["id"] == sub_id)
    events: list[dict[str, Any]] = [
        {"at": sub["created_at"], "kind": "created", "text": "subscription created"}
    ]
    for delivery in found.deliveries.get(sub_id, []):
        events.append(
            {
                "at": delivery["created_at"],
                "kind": "queued",
                "text": f"{delivery['event']} queued as {delivery['webhook_id']}",
            }
        )
        if delivery["status"] == "pending" and delivery["next_attempt_at"] is not None:
            events.append(
                {"at": delivery["next_attempt_at"], "kind": "next", "text": "next attempt due"}
            )
    for attempt in found.attempts.get(sub_id, []):
        code = attempt["status_code"]
        ok = code is not None and 200 <= code < 300
        answer = f"HTTP {code}" if code is not None else shown_text(attempt["error"], 120)
        events.append(
            {
                "at": attempt["started_at"],
                "kind": "ok" if ok else "failed",
                "text": f"attempt {attempt['attempt']}: {answer} in {attempt['duration_ms']} ms",
                "detail": shown_text(attempt["response_excerpt"], 160),
            }
        )
    if sub["delivered_at"] is not None:
        events.append({"at": sub["delivered_at"], "kind": "ok", "text": "delivered"})
    return sorted(events, key=lambda event: event["at"])


class Dashboard:
    """Renders the page; one per app, its reads cached for every viewer."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        metrics: Metrics,
        health: UpstreamHealth | None,
        node: str,
        signals: Signals | None = None,
    ) -> None:
        self._db = db
        self._metrics = metrics
        self._health = health
        self._node = node
        self._signals = signals
        self._overview = Cached(lambda: stats.overview(db), PAGE_MAX_AGE_S)
        self._chart = Cached(MinuteChart(db, settings.delivery_timeout_s + 30).read, PAGE_MAX_AGE_S)
        env = jinja2.Environment(
            loader=jinja2.PackageLoader("relay", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        env.filters.update(url=shown_url, text=shown_text, utc=utc)
        self._template = env.get_template("dashboard.html")

    async def render(self, query: str, nonce: str) -> str:
        overview = await self._overview.get()
        minutes = await self._chart.get()
        found: inspect.Found | None = None
        searched = query.strip()[:128]
        if searched:
            found = await inspect.find(self._db, searched)
        now = self._db.now()
        bars, top = chart_bars(minutes or [])
        polls = self._metrics.counts("relay_polls")
        return self._template.render(
            now=now,
            ago=lambda then: ago(then, now),
            node=self._node,
            version=__version__,
            refresh_s=REFRESH_S,
            nonce=nonce,
            overview=overview,
            chart_available=minutes is not None,
            bars=bars,
            chart_top=top,
            chart_height=CHART_HEIGHT_PX,
            delivered_last_hour=sum(m[1] for m in minutes or []),
            failed_last_hour=sum(m[2] for m in minutes or []),
            upstream_state=self._health.state if self._health is not None else "no worker",
            polls=polls,
            hints=self._metrics.counts("relay_hints"),
            hints_state=self._signals.hints_state() if self._signals else "off",
            last_hint_at=self._signals.last_hint_at() if self._signals else None,
            query=searched,
            found=found,
            timelines={s["id"]: timeline(found, s["id"]) for s in found.subscriptions}
            if found
            else {},
        )
