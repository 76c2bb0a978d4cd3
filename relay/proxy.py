"""Creating generations through the relay: POST /v1/generation/{provider}/{model...}.

One call creates the generation upstream and subscribes to it. Everything that can be
checked is checked before the upstream is called, so a refused request costs no credits:
the key (401/429), the path, the Relay-Callback-Url and Relay-Metadata headers (by the
subscription API's own rules and DNS check: `api.checked_subscription`) and the declared
size. The body is then streamed to the upstream (creator.py) as it arrives, counted against
RELAY_PROXY_MAX_BODY (413, mid-stream too), and the client gets the upstream's status and
body verbatim. When the upstream accepted (2xx with an `id`), the subscription is committed
before the answer is sent and named in Relay-Subscription-Id; refusals pass through with no
subscription. No answer from the upstream is 502 `upstream_unavailable` or 504
`upstream_timeout`; a 2xx without an id is 502 `upstream_invalid_answer`.

No SQL here (the store does it) and nothing of the worker's side: the routes only wake it
through the hooks in `ApiContext`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from relay import store
from relay.api import ApiContext, checked_subscription
from relay.creator import CreateAnswer, CreateFailed, UpstreamCreator
from relay.http import (
    Answer,
    ApiError,
    Endpoint,
    Operation,
    parse_object,
    route,
    validation_error,
)
from relay.schemas import ProxyHeaders, ProxyPath

logger = logging.getLogger(__name__)

# Validated as a subscription create, the headers need a generation id: the real one is
# only known once the upstream has answered.
_PENDING_ID = "pending"
_HEADER_OF_FIELD = {"callback_url": "Relay-Callback-Url", "metadata": "Relay-Metadata"}


@dataclass
class ProxyContext:
    """What the create route needs, built in the app's lifespan."""

    api: ApiContext
    creator: UpstreamCreator


class ClientGone(Exception):
    """The client went away before its body was all sent."""


class RequestBody:
    """The client's body as it arrives: counted against the limit, never held."""

    def __init__(self, receive: Receive, max_bytes: int) -> None:
        self._receive = receive
        self._max_bytes = max_bytes
        self.size = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk; 413 past the limit, ClientGone if the client left."""
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk: bytes = message.get("body", b"")
            self.size += len(chunk)
            if self.size > self._max_bytes:
                raise too_large(self._max_bytes)
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


def too_large(max_bytes: int) -> ApiError:
    return ApiError(
        413, "payload_too_large", f"the request body is over {max_bytes} bytes (the relay's limit)"
    )


def _failpoint(ctx: ProxyContext, name: str) -> None:
    """The test seam RELAY_FAILPOINT: die here, as a crash or a power cut would."""
    if ctx.api.settings.failpoint == name:
        logger.critical("failpoint %s: killing this process", name)
        os.kill(os.getpid(), signal.SIGKILL)


# --- Checking the request -------------------------------------------------------------------


def _headers(scope: Scope) -> dict[str, bytes]:
    """The request's headers by lower-case name (the first of repeated ones)."""
    found: dict[str, bytes] = {}
    for name, value in scope["headers"]:
        found.setdefault(name.decode("latin-1"), value)
    return found


def _model_path(scope: Scope) -> str:
    """`provider/model...`, checked safe to put in the upstream's path (404 if not)."""
    try:
        path = ProxyPath.model_validate(scope["path_params"])
    except ValidationError:
        raise ApiError(404, "not_found", "no such route: not a model path") from None
    if path.provider == "sse":
        raise ApiError(
            404,
            "not_found",
            "no such route: the relay answers creates as JSON; with RELAY_UPSTREAM_SSE=true "
            "it follows the upstream's stream itself",
        )
    return f"{path.provider}/{path.model}"


async def _subscription_target(ctx: ProxyContext, headers: Mapping[str, bytes]) -> Any:
    """The Relay-* headers checked as a subscription's `callback_url` and `metadata`."""
    data: dict[str, Any] = {"generation_id": _PENDING_ID}
    details: list[dict[str, str]] = []
    raw_url = headers.get("relay-callback-url")
    if raw_url is not None:
        try:
            data["callback_url"] = raw_url.decode()
        except UnicodeDecodeError:
            details.append({"field": "Relay-Callback-Url", "message": "must be UTF-8"})
    raw_metadata = headers.get("relay-metadata")
    if raw_metadata is not None:
        try:
            data["metadata"] = parse_object(raw_metadata)
        except ApiError as exc:
            details.append({"field": "Relay-Metadata", "message": exc.message})
    try:
        checked = await checked_subscription(ctx.api.settings, data)
    except ApiError as exc:
        details += [_renamed(detail) for detail in exc.details or ()]
        checked = None
    if details or checked is None:
        raise validation_error(details)
    return checked


def _renamed(detail: Mapping[str, str]) -> dict[str, str]:
    """A validation detail of the subscription's fields, named by the header instead."""
    field, _, rest = detail["field"].partition(".")
    header = _HEADER_OF_FIELD.get(field, field)
    message = "required" if detail["message"] == "Field required" else detail["message"]
    return {"field": f"{header}.{rest}" if rest else header, "message": message}


def _declared_length(headers: Mapping[str, bytes], max_bytes: int) -> int | None:
    raw = headers.get("content-length")
    if raw is None:
        return None
    try:
        declared = int(raw)
    except ValueError:
        return None  # the HTTP server refuses these before the route sees them
    if declared > max_bytes:
        raise too_large(max_bytes)
    return declared


# --- Answering ------------------------------------------------------------------------------


def _upstream_error(exc: CreateFailed) -> ApiError:
    maybe = (
        "; the generation may have been created upstream, and no subscription was made"
        if exc.sent
        else "; nothing was created and no subscription was made"
    )
    if exc.kind == "timeout":
        return ApiError(504, "upstream_timeout", exc.detail + maybe)
    if exc.kind == "invalid":
        return ApiError(502, "upstream_invalid_answer", exc.detail + maybe)
    return ApiError(502, "upstream_unavailable", exc.detail + maybe)


def _passed_through(answer: CreateAnswer, extra: Mapping[str, str]) -> Response:
    headers = dict(extra)
    if answer.content_type is not None:
        headers["content-type"] = answer.content_type
    if answer.retry_after is not None:
        headers["retry-after"] = answer.retry_after
    return Response(answer.body, status_code=answer.status, headers=headers)


# --- The route ------------------------------------------------------------------------------


async def _create(ctx: ProxyContext, scope: Scope, receive: Receive) -> Response | None:
    headers = _headers(scope)
    settings = ctx.api.settings
    key_hash = ctx.api.auth.key_hash(headers.get("authorization", b"").decode("latin-1"))
    key_id = await ctx.api.auth.key_id(key_hash)
    model_path = _model_path(scope)
    target = await _subscription_target(ctx, headers)
    declared = _declared_length(headers, settings.proxy_max_body_bytes)
    body = RequestBody(receive, settings.proxy_max_body_bytes)
    content_type = headers.get("content-type")
    started = time.monotonic()
    try:
        answer = await ctx.creator.create(
            model_path,
            body.chunks(),
            content_type=content_type.decode("latin-1") if content_type else None,
            content_length=declared,
        )
    except ClientGone:
        logger.info("create through the relay abandoned: the client left mid-body")
        return None
    except CreateFailed as exc:
        if exc.sent:
            logger.error(
                "create through the relay for key %s (%s): %s after the request went out; a "
                "generation may exist upstream that nobody is subscribed to",
                key_id,
                model_path,
                exc.detail,
            )
        raise _upstream_error(exc) from None
    answered = time.monotonic()
    if not answer.accepted:
        return _passed_through(answer, {})
    if answer.generation_id is None:
        logger.error(
            "create through the relay for key %s (%s): the upstream answered %d without a "
            "generation id; a generation may exist upstream that nobody is subscribed to",
            key_id,
            model_path,
            answer.status,
        )
        raise ApiError(
            502,
            "upstream_invalid_answer",
            f"the upstream answered {answer.status} without a generation id; the generation "
            "may have been created upstream, and no subscription was made",
        )
    _failpoint(ctx, "proxy.before_commit")
    metadata = target.metadata
    outcome = await store.record_proxied_create(
        ctx.api.db,
        store.ProxiedCreate(
            key_hash=key_hash,
            generation_id=answer.generation_id,
            callback_url=target.callback_url,
            metadata_json=orjson.dumps(metadata).decode() if metadata is not None else None,
            generation_status=answer.generation_status,
        ),
    )
    committed = time.monotonic()
    _failpoint(ctx, "proxy.after_commit")
    if outcome.polls_queued:
        ctx.api.on_polls_queued()
    if outcome.deliveries_queued:
        ctx.api.on_deliveries_queued()
    extra = {
        # The commit is the window in which a crash loses the subscription (README).
        "server-timing": (
            f"upstream;dur={(answered - started) * 1000:.1f}, "
            f"commit;dur={(committed - answered) * 1000:.1f}"
        )
    }
    if outcome.subscription is None:
        logger.warning(
            "key %s was revoked while its create went through; generation %s is not subscribed",
            key_id,
            answer.generation_id,
        )
    else:
        extra["relay-subscription-id"] = outcome.subscription["id"]
    return _passed_through(answer, extra)


class CreateThroughRelay:
    """POST /v1/generation/{provider}/{model...} as a bare ASGI app: the body is read as a
    stream (Starlette's Request would offer that too, but the route needs `receive` to tell
    a client that left from one that finished)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx: ProxyContext = scope["state"]["proxy"]
        response = await _create(ctx, scope, receive)
        if response is not None:
            await response(scope, receive, send)


CREATE = Operation(
    "createGeneration",
    "Create a generation upstream and subscribe to it, in one call",
    path=ProxyPath,
    headers=ProxyHeaders,
    raw_body=("application/json", "multipart/form-data"),
    answers={
        200: Answer(
            "the upstream accepted: its answer, verbatim (status and body); the generation "
            "is subscribed to",
            headers={"Relay-Subscription-Id": "the subscription made for the generation"},
        )
    },
    errors=(401, 404, 413, 422, 429, 502, 504),
    passthrough=Answer("the upstream refused: its answer, verbatim; no subscription is made"),
)

ROUTES = [
    route("/v1/generation/{provider}/{model:path}", POST=Endpoint(CREATE, CreateThroughRelay()))
]
