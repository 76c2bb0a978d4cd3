"""POST /v1/upstream/webhook: the upstream's workspace webhooks, taken in as push hints.

No relay key: a webhook is authenticated by its Standard Webhooks signature alone, against any
of RELAY_UPSTREAM_WEBHOOK_SECRET's secrets (several while the upstream rotates), with the
timestamp within 5 minutes; without a configured secret the route does not exist (404). The
body is bounded (256 KiB) and read before anything else is believed. A verified webhook is
answered 204 at once, without calling the upstream: its hint is applied in the database (many
concurrent webhooks in one transaction), where any node claims the polls it makes due, and a
repeated `webhook-id` changes nothing whatever its body.

What a payload says is hints.py's; how a hint changes a generation is the store's.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import orjson
from starlette.requests import Request
from starlette.responses import Response

from relay import store
from relay.batching import Batcher
from relay.config import Settings
from relay.database import Database
from relay.hints import parse_hint
from relay.http import Answer, ApiError, Operation, endpoint, read_body, route
from relay.metrics import Metrics
from relay.schedule import hinted_gap_s
from relay.schemas import HINT_BODY_MAX_BYTES, UpstreamWebhook
from relay.signals import Signals
from relay.signing import SignatureError, verify

logger = logging.getLogger(__name__)

WEBHOOK_ID_MAX_CHARS = 128  # the column; a longer id (unusual) is kept as its hash


@dataclass
class IntakeContext:
    """What the intake route needs, built in the app's lifespan."""

    db: Database
    settings: Settings
    signals: Signals
    metrics: Metrics = field(default_factory=lambda: Metrics(enabled=False))
    on_polls_queued: Callable[[], None] = lambda: None
    rand: Callable[[], float] = random.random
    hints: Batcher[store.IncomingHint, store.HintOutcome] = field(init=False)

    def __post_init__(self) -> None:
        self.hints = Batcher(self._apply, max_concurrent=4 if self.db.is_postgres else 1)

    async def _apply(self, hints: Sequence[store.IncomingHint]) -> list[store.HintOutcome]:
        outcomes = await store.apply_hints(self.db, hints)
        if store.HintOutcome.DUE in outcomes:
            self.on_polls_queued()
        return outcomes


def _stored_id(webhook_id: str) -> str:
    if len(webhook_id) <= WEBHOOK_ID_MAX_CHARS:
        return webhook_id
    return "sha256:" + hashlib.sha256(webhook_id.encode()).hexdigest()


async def upstream_webhook(request: Request) -> Response:
    ctx: IntakeContext = request.state.intake
    secrets = ctx.settings.upstream_webhook_secrets
    if not secrets:
        raise ApiError(404, "not_found", "no such route (RELAY_UPSTREAM_WEBHOOK_SECRET is unset)")
    body = await read_body(
        request.headers.get("content-length"), request.receive, HINT_BODY_MAX_BYTES
    )
    try:
        webhook_id = verify(secrets, request.headers, body, time.time())
    except SignatureError as exc:
        ctx.metrics.hint("refused")
        raise ApiError(401, "unauthorized", f"webhook signature refused: {exc}") from None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    hint = parse_hint(payload)
    safety_s = hinted_gap_s(ctx.settings.hinted_poll_interval_s, ctx.rand)
    outcome = await ctx.hints.submit(
        store.IncomingHint(
            webhook_id=_stored_id(webhook_id),
            generation_id=hint.generation_id if hint else None,
            status=hint.status if hint else None,
            safety_poll_at=ctx.db.now() + timedelta(seconds=safety_s),
        )
    )
    ctx.metrics.hint("duplicate" if outcome == store.HintOutcome.DUPLICATE else "accepted")
    await ctx.signals.note_hint()
    logger.debug(
        "push hint %s for %s (%s): %s",
        webhook_id[:64],
        hint.generation_id if hint else None,
        hint.status if hint else None,
        outcome,
    )
    return Response(status_code=204)


UPSTREAM_WEBHOOK = Operation(
    "receiveUpstreamWebhook",
    "Take one of the upstream's workspace webhooks as a push hint (Standard Webhooks "
    "headers webhook-id, webhook-timestamp and webhook-signature; no relay key)",
    {204: Answer("accepted (a repeated webhook-id too, changing nothing)")},
    errors=(400, 401, 404, 413),
    body=UpstreamWebhook,
    security="webhookSignature",
)

ROUTES = [route("/v1/upstream/webhook", POST=endpoint(UPSTREAM_WEBHOOK, upstream_webhook))]
