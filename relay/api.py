"""The HTTP API: routes, validation at the edge, contract-shaped errors. No SQL here.

Every request is answered with the contract's status and error code; nothing a client sends
can produce a 5xx (a database outage answers 503 `unavailable`). Creates from concurrent
requests are written together in one transaction (group commit, see batching.py), which is
how ingest outruns a one-insert-per-request handler.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from relay import store
from relay.addresses import CallbackURLError
from relay.batching import Batcher
from relay.config import Settings
from relay.database import Database
from relay.health import UpstreamHealth
from relay.models import SubscriptionStatus
from relay.ratelimit import KeyedLimiter
from relay.resolver import vet_callback_url
from relay.schemas import (
    BODY_MAX_BYTES,
    GENERATION_ID_PATTERN,
    METADATA_MAX_BYTES,
    SubscriptionCreate,
)

logger = logging.getLogger(__name__)

SUBSCRIPTION_ID = re.compile(r"sub_[0-9A-Z]{26}")
LIMIT = re.compile(r"[0-9]{1,3}")
CALLBACK_URL_MAX_BYTES = 2048
STATUSES = tuple(SubscriptionStatus)
GENERATION_ID = re.compile(GENERATION_ID_PATTERN.strip("^$"))


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[dict[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


def json_response(
    content: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(content), status_code=status, media_type="application/json", headers=headers
    )


def error_response(exc: ApiError) -> Response:
    error: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.details is not None:
        error["details"] = exc.details
    return json_response({"error": error}, exc.status, exc.headers)


@dataclass
class ApiContext:
    """What the routes need, built in the app's lifespan."""

    db: Database
    settings: Settings
    health: UpstreamHealth | None
    on_polls_queued: Callable[[], None] = lambda: None
    on_deliveries_queued: Callable[[], None] = lambda: None
    limiter: KeyedLimiter | None = None
    creates: Batcher[store.CreateRequest, store.CreateResult] = field(init=False)

    def __post_init__(self) -> None:
        self.creates = Batcher(self._write_creates, max_concurrent=4 if self.db.is_postgres else 1)
        rate = self.settings.rate_limit_per_s
        if rate > 0 and self.limiter is None:
            self.limiter = KeyedLimiter(rate, burst=max(1.0, 2 * rate))

    async def _write_creates(
        self, requests: Sequence[store.CreateRequest]
    ) -> list[store.CreateResult]:
        outcome = await store.create_subscriptions(self.db, requests)
        if outcome.polls_queued:
            self.on_polls_queued()
        if outcome.deliveries_queued:
            self.on_deliveries_queued()
        return outcome.results


def _ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.state.api
    return ctx


# --- Formatting -----------------------------------------------------------------------------


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


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


# --- Edge checks ----------------------------------------------------------------------------


def _bearer_hash(header: str) -> str:
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "send your API key as Authorization: Bearer <key>")
    return store.hash_api_key(token)


def _check_rate(ctx: ApiContext, key_hash: str) -> None:
    if ctx.limiter is None:
        return
    wait_s = ctx.limiter.check(key_hash)
    if wait_s > 0:
        retry_after = str(max(1, int(wait_s + 0.999)))
        raise ApiError(
            429,
            "rate_limited",
            f"too many requests for this key; retry after {retry_after} s",
            headers={"retry-after": retry_after},
        )


async def _authenticate(request: Request) -> str:
    """The caller's key id (401 unless live), after the rate limit."""
    ctx = _ctx(request)
    key_hash = _bearer_hash(request.headers.get("authorization", ""))
    _check_rate(ctx, key_hash)
    key_id = await store.authenticate(ctx.db, key_hash)
    if key_id is None:
        raise ApiError(401, "unauthorized", "unknown or revoked API key")
    return key_id


async def _read_body(declared: str | None, chunks_in: AsyncIterator[bytes]) -> bytes:
    """The body, refused with 413 past BODY_MAX_BYTES without reading it whole."""
    too_large = ApiError(
        413, "payload_too_large", f"the request body is over {BODY_MAX_BYTES // 1024} KiB"
    )
    if declared is not None:
        try:
            if int(declared) > BODY_MAX_BYTES:
                raise too_large
        except ValueError:
            raise ApiError(
                400, "invalid_json", "the Content-Length header is not a number"
            ) from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in chunks_in:
        size += len(chunk)
        if size > BODY_MAX_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_object(body: bytes) -> dict[str, Any]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    return parsed


def _validation_error(details: list[dict[str, str]]) -> ApiError:
    fields = ", ".join(d["field"] for d in details)
    return ApiError(422, "validation_error", f"invalid fields: {fields}", details)


def _pydantic_details(exc: ValidationError) -> list[dict[str, str]]:
    details = []
    for error in exc.errors(include_url=False, include_context=False, include_input=False):
        location = ".".join(str(part) for part in error["loc"]) or "body"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        details.append({"field": location, "message": message})
    return details


def _subscription_id(request: Request) -> str:
    sub_id: str = request.path_params["id"]
    if not SUBSCRIPTION_ID.fullmatch(sub_id):
        raise ApiError(404, "not_found", "no such subscription")
    return sub_id


# --- Routes ---------------------------------------------------------------------------------


async def _create(
    ctx: ApiContext, authorization: str, declared_length: str | None, body: AsyncIterator[bytes]
) -> tuple[int, dict[str, Any]]:
    key_hash = _bearer_hash(authorization)
    _check_rate(ctx, key_hash)
    try:
        parsed = _parse_object(await _read_body(declared_length, body))
        try:
            payload = SubscriptionCreate.model_validate(parsed)
        except ValidationError as exc:
            raise _validation_error(_pydantic_details(exc)) from None
        details: list[dict[str, str]] = []
        metadata_json: str | None = None
        if payload.metadata is not None:
            metadata_json = orjson.dumps(payload.metadata).decode()
            if len(metadata_json.encode()) > METADATA_MAX_BYTES:
                details.append(
                    {"field": "metadata", "message": "must be at most 4 KiB when serialized"}
                )
        if len(payload.callback_url.encode()) > CALLBACK_URL_MAX_BYTES:
            # Indexed for idempotency, and an index row has a size limit: bound the bytes too.
            details.append(
                {"field": "callback_url", "message": "must be at most 2048 bytes as UTF-8"}
            )
        try:
            await vet_callback_url(
                payload.callback_url, allow_private=ctx.settings.allow_private_callbacks
            )
        except CallbackURLError as exc:
            details.append({"field": "callback_url", "message": str(exc)})
        if details:
            raise _validation_error(details)
    except ApiError:
        # Bad input from an unknown or revoked key is still a 401 first.
        if await store.authenticate(ctx.db, key_hash) is None:
            raise ApiError(401, "unauthorized", "unknown or revoked API key") from None
        raise
    result = await ctx.creates.submit(
        store.CreateRequest(
            key_hash=key_hash,
            generation_id=payload.generation_id,
            callback_url=payload.callback_url,
            metadata_json=metadata_json,
        )
    )
    if result.subscription is None:
        raise ApiError(401, "unauthorized", "unknown or revoked API key")
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
        status, content = await _create(ctx, authorization, declared, _body_chunks(receive))
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


async def _body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


async def get_subscription(request: Request) -> Response:
    key_id = await _authenticate(request)
    row = await store.get_subscription(_ctx(request).db, key_id, _subscription_id(request))
    if row is None:
        raise ApiError(404, "not_found", "no such subscription")
    return json_response(subscription_json(row))


def _encode_cursor(sub_id: str) -> str:
    return base64.urlsafe_b64encode(sub_id.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str | None:
    try:
        decoded = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return decoded if SUBSCRIPTION_ID.fullmatch(decoded) else None


async def list_subscriptions(request: Request) -> Response:
    key_id = await _authenticate(request)
    params = request.query_params
    details: list[dict[str, str]] = []
    status = params.get("status") or None
    if status is not None and status not in STATUSES:
        details.append({"field": "status", "message": f"must be one of {', '.join(STATUSES)}"})
    generation_id = params.get("generation_id") or None
    if generation_id is not None and not GENERATION_ID.fullmatch(generation_id):
        details.append(
            {"field": "generation_id", "message": "must be 1-128 characters of A-Z a-z 0-9 _ . : -"}
        )
    limit = 50
    raw_limit = params.get("limit")
    if raw_limit:
        if not LIMIT.fullmatch(raw_limit) or not 1 <= int(raw_limit) <= 500:
            details.append({"field": "limit", "message": "must be a whole number from 1 to 500"})
        else:
            limit = int(raw_limit)
    before_id = None
    cursor = params.get("cursor")
    if cursor:
        before_id = _decode_cursor(cursor)
        if before_id is None:
            details.append({"field": "cursor", "message": "not a cursor this API gave out"})
    if details:
        raise _validation_error(details)
    rows, more = await store.list_subscriptions(
        _ctx(request).db,
        key_id,
        status=status,
        generation_id=generation_id,
        limit=limit,
        before_id=before_id,
    )
    next_cursor = _encode_cursor(rows[-1]["id"]) if more and rows else None
    return json_response(
        {"items": [subscription_json(row) for row in rows], "next_cursor": next_cursor}
    )


async def cancel_subscription(request: Request) -> Response:
    key_id = await _authenticate(request)
    row = await store.cancel_subscription(_ctx(request).db, key_id, _subscription_id(request))
    if row is None:
        raise ApiError(404, "not_found", "no such subscription")
    return json_response(subscription_json(row))


async def list_attempts(request: Request) -> Response:
    key_id = await _authenticate(request)
    rows = await store.list_attempts(_ctx(request).db, key_id, _subscription_id(request))
    if rows is None:
        raise ApiError(404, "not_found", "no such subscription")
    return json_response({"items": [attempt_json(row) for row in rows]})


async def redeliver(request: Request) -> Response:
    ctx = _ctx(request)
    key_id = await _authenticate(request)
    try:
        row = await store.redeliver(ctx.db, key_id, _subscription_id(request))
    except store.RedeliverConflict as exc:
        raise ApiError(409, "conflict", f"nothing to redeliver: {exc}") from None
    if row is None:
        raise ApiError(404, "not_found", "no such subscription")
    ctx.on_deliveries_queued()
    return json_response(subscription_json(row), 202)


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    ctx = _ctx(request)
    database_ok = await ctx.db.ping()
    body = {
        "database": "ok" if database_ok else "unavailable",
        "upstream": ctx.health.state if ctx.health is not None else "unknown",
    }
    return json_response(body, 200 if database_ok else 503)


# --- Error handlers -------------------------------------------------------------------------


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        # RFC 9110: a 405 carries Allow, every method of the path. Starlette's names only
        # the first route of the path, and each method here has a route of its own.
        allow = ", ".join(sorted(_methods_of_path(request))) or (exc.headers or {}).get("allow")
        return error_response(
            ApiError(
                405,
                "method_not_allowed",
                "method not allowed here",
                headers={"allow": allow} if allow else None,
            )
        )
    return error_response(ApiError(404, "not_found", "no such route"))


def _methods_of_path(request: Request) -> set[str]:
    methods: set[str] = set()
    for route in ROUTES:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE and route.methods:
            methods |= route.methods
    return methods


async def handle_database_error(request: Request, exc: Exception) -> Response:
    logger.error("database error answering %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        ApiError(
            503,
            "unavailable",
            "the database is unavailable; retry later",
            headers={"retry-after": "1"},
        )
    )


EXCEPTION_HANDLERS = {
    ApiError: handle_api_error,
    HTTPException: handle_http_exception,
    SQLAlchemyError: handle_database_error,
    OSError: handle_database_error,
}

ROUTES = [
    Route("/v1/subscriptions", CreateSubscription(), methods=["POST"]),
    Route("/v1/subscriptions", list_subscriptions, methods=["GET"]),
    Route("/v1/subscriptions/{id}", get_subscription, methods=["GET"]),
    Route("/v1/subscriptions/{id}", cancel_subscription, methods=["DELETE"]),
    Route("/v1/subscriptions/{id}/attempts", list_attempts, methods=["GET"]),
    Route("/v1/subscriptions/{id}/redeliver", redeliver, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
