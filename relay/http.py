"""The HTTP layer under every route: errors in the contract's shape, JSON answers, request
bodies under the size cap, request validation through the schemas' models, and the table
each route is built from (a path, its methods, and what each method is: its `Operation`).

Nothing a client sends may produce a 5xx: routes raise `ApiError`, and the exception handlers
here turn it, Starlette's 404/405 and a database outage (503 `unavailable`) into the error
body. No route logic and no SQL here; the OpenAPI document is built from the same table
(openapi.py), so what is served and what is documented are one list.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, request_response
from starlette.types import ASGIApp, Receive, Scope, Send

from relay.outages import report_failure
from relay.schemas import BODY_MAX_BYTES, ErrorCode, parse_json

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """An answer in the contract's error shape: `{"error": {"code", "message", "details"}}`."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
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


# --- Reading requests -----------------------------------------------------------------------


def _too_large(limit_bytes: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the request body is over {limit_bytes // 1024} KiB")


def _check_declared(declared: str | None, limit_bytes: int) -> None:
    """413 for a Content-Length over the limit, before any of the body is read."""
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError:
        raise ApiError(400, "invalid_json", "the Content-Length header is not a number") from None
    if length > limit_bytes:
        raise _too_large(limit_bytes)


async def read_body(
    declared: str | None, receive: Receive, limit_bytes: int = BODY_MAX_BYTES
) -> bytes:
    """The body, straight from ASGI `receive` (no async generator per request: the create hot
    path), refused with 413 past `limit_bytes` without reading it whole. A client gone
    mid-body leaves what had arrived."""
    _check_declared(declared, limit_bytes)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit_bytes:
            raise _too_large(limit_bytes)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_object(body: bytes) -> dict[str, Any]:
    try:
        parsed = parse_json(body)
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    return parsed


def validation_error(details: list[dict[str, str]]) -> ApiError:
    fields = ", ".join(d["field"] for d in details)
    return ApiError(422, "validation_error", f"invalid fields: {fields}", details)


def pydantic_details(exc: ValidationError) -> list[dict[str, str]]:
    """One `{"field", "message"}` per error, the field as a dotted path."""
    details = []
    for error in exc.errors(include_url=False, include_context=False, include_input=False):
        location = ".".join(str(part) for part in error["loc"]) or "body"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        details.append({"field": location, "message": message})
    return details


def validate(model: type[M], data: Any) -> M:
    """`data` as `model`, or 422 `validation_error` with details per field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(pydantic_details(exc)) from None


def parse_query(model: type[M], request: Request) -> M:
    """The query string as `model` (the last value of a repeated parameter counts)."""
    return validate(model, dict(request.query_params))


# --- The route table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One documented answer: what it means, its body's model, and the operations a client
    can call next with the `id` of that body (OpenAPI links, for clients and fuzzers)."""

    description: str
    model: type[BaseModel] | None = None
    links: tuple[str, ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)  # name: what it carries


@dataclass(frozen=True)
class Operation:
    """What one method of one path is, declared beside its handler: openapi.py publishes it.

    `errors` are the error statuses it may answer (their codes are the contract's). `body`,
    `query`, `path` and `headers` are the models its handler validates its input with;
    `raw_body` the media types of a body passed on unread, and `passthrough` what is answered
    with another server's status (the OpenAPI `default` answer); `error_notes` say what an
    error status means on this route where the common description does not fit.
    """

    operation_id: str
    summary: str
    answers: Mapping[int, Answer]
    errors: tuple[int, ...] = ()
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    path: type[BaseModel] | None = None
    authenticated: bool = True
    security: str = "bearer"  # the scheme (openapi.SECURITY_SCHEMES) when authenticated
    headers: type[BaseModel] | None = None
    raw_body: tuple[str, ...] = ()
    passthrough: Answer | None = None
    error_notes: Mapping[int, str] = field(default_factory=dict)  # this route's own codes


@dataclass(frozen=True)
class Endpoint:
    """An operation and the ASGI app that serves it."""

    operation: Operation
    app: ASGIApp


def endpoint(operation: Operation, handler: Callable[[Request], Awaitable[Response]]) -> Endpoint:
    """A request/response function as an endpoint."""
    return Endpoint(operation, request_response(handler))


@dataclass
class Methods:
    """One path's methods, dispatched as one ASGI app, so a path is one route and Starlette's
    405 names every method of the path in Allow. A bare ASGI handler (the create hot path)
    and request/response functions sit side by side."""

    endpoints: Mapping[str, Endpoint]
    _apps: dict[str, ASGIApp] = field(init=False)

    def __post_init__(self) -> None:
        self._apps = {method: served.app for method, served in self.endpoints.items()}
        if "GET" in self._apps:
            self._apps.setdefault("HEAD", self._apps["GET"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Route has already answered 405 for a method not in the table.
        await self._apps[scope["method"]](scope, receive, send)


def route(path: str, **endpoints: Endpoint) -> Route:
    """The route of `path`, one endpoint per method (`GET=..., POST=...`)."""
    return Route(path, Methods(endpoints), methods=list(endpoints))


def operations(route: Route) -> Mapping[str, Operation]:
    """The operations of a route built by `route()`, by method."""
    if not isinstance(route.endpoint, Methods):
        return {}
    return {method: served.operation for method, served in route.endpoint.endpoints.items()}


# --- Exception handlers ---------------------------------------------------------------------


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        # RFC 9110: a 405 carries Allow. Each path is one route, so Starlette's list is
        # every method of the path; sorted, so the header is stable.
        allowed = (exc.headers or {}).get("Allow", "")
        allow = ", ".join(sorted(m.strip() for m in allowed.split(",") if m.strip()))
        return error_response(
            ApiError(
                405,
                "method_not_allowed",
                "method not allowed here",
                headers={"allow": allow} if allow else None,
            )
        )
    return error_response(ApiError(404, "not_found", "no such route"))


async def handle_database_error(request: Request, exc: Exception) -> Response:
    # The app's state carries the database (and its outage tracker) as `api.db`.
    context = getattr(request.state, "api", None)
    report_failure(
        logger,
        exc,
        getattr(getattr(context, "db", None), "outage", None),
        "API requests answered 503",
        "database error answering %s %s",
        request.method,
        request.url.path,
    )
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
