"""The client API: the subscription routes, what each one is (its `Operation`), and how
subscriptions and attempts are shown. No SQL here (the store does it), and nothing of the poller or
the deliverer: the routes only wake them through the hooks in `ApiContext`.

Creates from concurrent requests are written together in one transaction (group commit, see
batching.py), which is how ingest outruns a one-insert-per-request handler.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from relay import store
from relay.addresses import CallbackURLError
from relay.auth import Authenticator, client_address, unauthorized
from relay.batching import Batcher
from relay.config import Settings
from relay.database import Database
from relay.health import UpstreamHealth
from relay.http import (
    Answer,
    ApiError,
    Endpoint,
    Operation,
    endpoint,
    json_response,
    parse_object,
    parse_query,
    read_body,
    route,
    validate,
    validation_error,
)
from relay.quota import ActiveEstimates
from relay.resolver import IntakeResolver
from relay.schemas import (
    AttemptList,
    Subscription,
    SubscriptionCreate,
    SubscriptionList,
    SubscriptionListQuery,
    SubscriptionPath,
)
from relay.signals import Signals

T = TypeVar("T")


@dataclass
class ApiContext:
    """What the routes need, built in the app's lifespan."""

    db: Database
    settings: Settings
    health: UpstreamHealth | None
    signals: Signals | None = None
    on_polls_queued: Callable[[], None] = lambda: None
    on_deliveries_queued: Callable[[], None] = lambda: None
    intake: IntakeResolver = field(default_factory=IntakeResolver)
    auth: Authenticator = field(init=False)
    creates: Batcher[store.CreateRequest, store.CreateResult] = field(init=False)
    quota: ActiveEstimates = field(init=False)

    def __post_init__(self) -> None:
        self.auth = Authenticator(
            self.db, self.settings.rate_limit_per_s, self.settings.auth_failure_limit_per_s
        )
        self.creates = Batcher(self._write_creates, max_concurrent=4 if self.db.is_postgres else 1)
        self.quota = ActiveEstimates(self.settings.max_active_per_key)

    def first_poll(self) -> store.FirstPoll:
        """When new generations get their first per-id poll (push hints, sweeps)."""
        return self.signals.first_poll() if self.signals else store.FirstPoll()

    async def _write_creates(
        self, requests: Sequence[store.CreateRequest]
    ) -> list[store.CreateResult]:
        options = store.CreateOptions(
            first_poll=self.first_poll(), max_active_per_key=self.settings.max_active_per_key
        )
        outcome = await store.create_subscriptions(self.db, requests, options)
        for key_id, active in outcome.active_counts.items():
            self.quota.counted(key_id, active)
        for result in outcome.results:
            if result.created and result.subscription is not None:
                key_id = result.subscription["api_key_id"]
                if key_id not in outcome.active_counts:
                    self.quota.created(key_id)
        if outcome.polls_queued:
            self.on_polls_queued()
        if outcome.deliveries_queued:
            self.on_deliveries_queued()
        return outcome.results


def context(request: Request) -> ApiContext:
    ctx: ApiContext = request.state.api
    return ctx


# --- Formatting -----------------------------------------------------------------------------


def _time(value: datetime | None) -> str | None:
    """RFC 3339 in UTC to the second, `2026-12-01T12:00:00Z` (%-formatting: half strftime's
    time, and three of these go into every answer)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # as strftime wrote it: naive times are UTC here
    elif value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    fields = (value.year, value.month, value.day, value.hour, value.minute, value.second)
    return "%04d-%02d-%02dT%02d:%02d:%02dZ" % fields  # noqa: UP031 (faster than an f-string)


def subscription_json(row: Mapping[Any, Any]) -> dict[str, Any]:
    metadata = row["metadata"]
    return {
        "id": row["id"],
        "generation_id": row["generation_id"],
        "callback_url": row["callback_url"],
        "metadata": orjson.loads(metadata) if metadata is not None else None,
        "status": row["status"],
        "generation_status": row["generation_status"],
        "attempts": row["attempts"],
        "last_error": row["last_error"],
        "created_at": _time(row["created_at"]),
        "updated_at": _time(row["updated_at"]),
        "delivered_at": _time(row["delivered_at"]),
    }


def attempt_json(row: Mapping[Any, Any]) -> dict[str, Any]:
    return {
        "attempt": row["attempt"],
        "webhook_id": row["webhook_id"],
        "started_at": _time(row["started_at"]),
        "duration_ms": row["duration_ms"],
        "status_code": row["status_code"],
        "error": row["error"],
        "response_excerpt": row["response_excerpt"],
    }


# --- Create: the hot path -------------------------------------------------------------------


async def checked_subscription(ctx: ApiContext, data: Any) -> SubscriptionCreate:
    """`data` as a subscription create, its callback URL vetted (DNS included, on the intake's
    own resolver): 422 `validation_error` if either is wrong. Creates through the relay check
    their Relay-* headers here too, so both routes keep one set of rules."""
    payload = validate(SubscriptionCreate, data)
    try:
        await ctx.intake.vet(
            payload.callback_url, allow_private=ctx.settings.allow_private_callbacks
        )
    except CallbackURLError as exc:
        raise validation_error([{"field": "callback_url", "message": str(exc)}]) from None
    return payload


async def _create(
    ctx: ApiContext,
    authorization: str,
    address: str,
    declared_length: str | None,
    receive: Receive,
) -> tuple[int, dict[str, Any]]:
    # The key first: an unknown or revoked key is refused before the body is read. The batch
    # checks the key again in its transaction, so the cache cannot let a revoked key create.
    caller = await ctx.auth.authenticate(authorization, address, cached=True)
    payload = await checked_subscription(
        ctx, parse_object(await read_body(declared_length, receive))
    )
    metadata = payload.metadata
    result = await ctx.creates.submit(
        store.CreateRequest(
            key_hash=caller.key_hash,
            generation_id=payload.generation_id,
            callback_url=payload.callback_url,
            metadata_json=orjson.dumps(metadata).decode() if metadata is not None else None,
            count_active=ctx.quota.needs_count(caller.key_id),
        )
    )
    if result.not_found:
        raise ApiError(404, "not_found", "no such generation for this key")
    if result.quota_exceeded:
        raise ApiError(
            429,
            "quota_exceeded",
            f"this key already has {ctx.settings.max_active_per_key} active subscriptions "
            "(RELAY_MAX_ACTIVE_PER_KEY); wait for some to end, or cancel some",
        )
    if result.subscription is None:
        raise unauthorized()
    return (201 if result.created else 200), subscription_json(result.subscription)


class CreateSubscription:
    """POST /v1/subscriptions as a bare ASGI app: the hot path, without Request/Response
    objects (the profile showed them costing more than validation and the insert together).
    Errors raise ApiError like every route, answered by the app's exception handler."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx: ApiContext = scope["state"]["api"]
        authorization = ""
        declared: str | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-length":
                declared = value.decode("latin-1")
        status, content = await _create(
            ctx, authorization, client_address(scope), declared, receive
        )
        body = orjson.dumps(content)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


# --- The other routes -----------------------------------------------------------------------


async def _key_id(request: Request) -> str:
    """The caller's key id, looked up now (a key revoked a moment ago is refused)."""
    authorization = request.headers.get("authorization", "")
    caller = await context(request).auth.authenticate(authorization, client_address(request.scope))
    return caller.key_id


def _not_found() -> ApiError:
    return ApiError(404, "not_found", "no such subscription")


async def _owned(
    request: Request, lookup: Callable[[Database, str, str], Awaitable[T | None]]
) -> T:
    """`lookup` of the subscription in the path, for the caller's key; 404 if not theirs."""
    ctx = context(request)
    key_id = await _key_id(request)
    try:
        sub_id = SubscriptionPath.model_validate(request.path_params).id
    except ValidationError:
        raise _not_found() from None
    found = await lookup(ctx.db, key_id, sub_id)
    if found is None:
        raise _not_found()
    return found


async def get_subscription(request: Request) -> Response:
    return json_response(subscription_json(await _owned(request, store.get_subscription)))


async def cancel_subscription(request: Request) -> Response:
    return json_response(subscription_json(await _owned(request, store.cancel_subscription)))


async def list_attempts(request: Request) -> Response:
    rows = await _owned(request, store.list_attempts)
    return json_response({"items": [attempt_json(row) for row in rows]})


async def _redeliver(db: Database, key_id: str, sub_id: str) -> Mapping[Any, Any] | None:
    try:
        return await store.redeliver(db, key_id, sub_id)
    except store.RedeliverConflict as exc:
        raise ApiError(409, "conflict", f"nothing to redeliver: {exc}") from None


async def redeliver(request: Request) -> Response:
    row = await _owned(request, _redeliver)
    context(request).on_deliveries_queued()
    return json_response(subscription_json(row), 202)


async def list_subscriptions(request: Request) -> Response:
    ctx = context(request)
    key_id = await _key_id(request)
    query = parse_query(SubscriptionListQuery, request)
    rows, more = await store.list_subscriptions(
        ctx.db,
        key_id,
        status=query.status,
        generation_id=query.generation_id,
        limit=query.limit,
        before_id=query.cursor,
    )
    # The cursor is the last id shown: ids sort by creation, so the next page is older ones.
    next_cursor = rows[-1]["id"] if more and rows else None
    return json_response(
        {"items": [subscription_json(row) for row in rows], "next_cursor": next_cursor}
    )


# --- What each route is ---------------------------------------------------------------------

_BY_ID = ("getSubscription", "cancelSubscription", "listAttempts", "redeliverSubscription")

CREATE = Operation(
    "createSubscription",
    "Create a subscription (idempotent per key, generation and URL)",
    body=SubscriptionCreate,
    answers={
        201: Answer("created", Subscription, links=_BY_ID),
        200: Answer("an identical active subscription exists", Subscription, links=_BY_ID),
    },
    errors=(400, 401, 404, 408, 413, 422, 429),
)
LIST = Operation(
    "listSubscriptions",
    "List this key's subscriptions, newest first",
    query=SubscriptionListQuery,
    answers={200: Answer("a page of subscriptions", SubscriptionList)},
    errors=(401, 422, 429),
)


def _by_id(
    operation_id: str, summary: str, answer: Answer, status: int = 200, errors: tuple[int, ...] = ()
) -> Operation:
    """An operation on the subscription in the path: a bad or foreign id is 404."""
    all_errors = tuple(sorted({401, 404, 429, *errors}))
    return Operation(operation_id, summary, {status: answer}, all_errors, path=SubscriptionPath)


GET = _by_id("getSubscription", "Get a subscription", Answer("the subscription", Subscription))
CANCEL = _by_id(
    "cancelSubscription",
    "Cancel a subscription (a final one stays as it was)",
    Answer("the subscription, now canceled", Subscription),
)
ATTEMPTS = _by_id(
    "listAttempts", "Delivery attempts, oldest first", Answer("the attempts", AttemptList)
)
REDELIVER = _by_id(
    "redeliverSubscription",
    "Send the stored final result again (same webhook-id)",
    Answer("queued", Subscription),
    status=202,
    errors=(409,),
)

ROUTES = [
    route(
        "/v1/subscriptions",
        POST=Endpoint(CREATE, CreateSubscription()),
        GET=endpoint(LIST, list_subscriptions),
    ),
    route(
        "/v1/subscriptions/{id}",
        GET=endpoint(GET, get_subscription),
        DELETE=endpoint(CANCEL, cancel_subscription),
    ),
    route("/v1/subscriptions/{id}/attempts", GET=endpoint(ATTEMPTS, list_attempts)),
    route("/v1/subscriptions/{id}/redeliver", POST=endpoint(REDELIVER, redeliver)),
]
