"""What a create through the relay asks for, checked before anything is forwarded: the key,
the model path, the Relay-* headers, the Idempotency-Key and the declared size; and the
body, read as it arrives.

Everything here runs before the upstream hears of the request, so every refusal costs no
credits. The Relay-* headers are checked as a subscription's `callback_url` and `metadata`
by the subscription API's own function (`api.checked_subscription`), so both routes keep
one set of rules. No route logic and no SQL here.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError
from starlette.types import Receive, Scope

from relay import store
from relay.api import ApiContext, checked_subscription
from relay.auth import client_address
from relay.http import ApiError, parse_object, pydantic_details, validation_error
from relay.schemas import IdempotencyKey, ProxyPath

# Validated as a subscription create, the headers need a generation id: the real one is
# only known once the upstream has answered.
_PENDING_ID = "pending"
# What the upstream takes; anything else (no body at all included) is refused before it
# costs a create.
FORWARDED_MEDIA_TYPES = ("application/json", "multipart/form-data")
_HEADER_OF_FIELD = {"callback_url": "Relay-Callback-Url", "metadata": "Relay-Metadata"}
_IDEMPOTENCY_KEY: TypeAdapter[str] = TypeAdapter(IdempotencyKey)


class ClientGone(Exception):
    """The client went away before its body was all sent."""


def too_large(max_bytes: int) -> ApiError:
    return ApiError(
        413, "payload_too_large", f"the request body is over {max_bytes} bytes (the relay's limit)"
    )


class RequestBody:
    """The client's body as it arrives: counted against the limit, hashed if asked, never
    held."""

    def __init__(self, receive: Receive, max_bytes: int, *, hashing: bool) -> None:
        self._receive = receive
        self._max_bytes = max_bytes
        self._digest = hashlib.sha256() if hashing else None
        self.size = 0
        self.complete = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk; 413 past the limit, ClientGone if the client left."""
        while not self.complete:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk: bytes = message.get("body", b"")
            self.size += len(chunk)
            if self.size > self._max_bytes:
                raise too_large(self._max_bytes)
            if self._digest is not None:
                self._digest.update(chunk)
            self.complete = not message.get("more_body", False)
            if chunk:
                yield chunk

    async def read_through(self) -> str | None:
        """Read the rest of the body only to hash it; its sha256 (see `sha256`)."""
        async for _ in self.chunks():
            pass
        return self.sha256()

    def sha256(self) -> str | None:
        """The whole body's sha256 once it was read to the end (and hashed), else None."""
        if self._digest is None or not self.complete:
            return None
        return self._digest.hexdigest()


@dataclass
class CreateJob:
    """A create through the relay that passed every check."""

    key_hash: str
    key_id: str
    model_path: str  # provider/model..., safe in the upstream's path
    callback_url: str
    metadata_json: str | None
    idempotency_key: str | None
    fingerprint: store.RequestFingerprint
    content_type: str
    declared_length: int | None
    body: RequestBody


async def checked_request(ctx: ApiContext, scope: Scope, receive: Receive) -> CreateJob:
    """The request's checks, in the contract's order: the key (401/429) before anything,
    then the path (404), the headers (422), the body's media type (415) and the declared
    size (413)."""
    headers: dict[str, bytes] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name.decode("latin-1"), value)
    caller = await ctx.auth.authenticate(
        headers.get("authorization", b"").decode("latin-1"), client_address(scope)
    )
    key_hash, key_id = caller.key_hash, caller.key_id
    model_path = _model_path(scope)
    target = await _subscription_target(ctx, headers)
    await _check_quota(ctx, key_id)
    metadata = target.metadata
    metadata_json = orjson.dumps(metadata).decode() if metadata is not None else None
    idempotency_key = _idempotency_key(headers)
    max_bytes = ctx.settings.proxy_max_body_bytes
    target_sha256 = hashlib.sha256(orjson.dumps([target.callback_url, metadata_json])).hexdigest()
    content_type = _content_type(headers)
    return CreateJob(
        key_hash=key_hash,
        key_id=key_id,
        model_path=model_path,
        callback_url=target.callback_url,
        metadata_json=metadata_json,
        idempotency_key=idempotency_key,
        fingerprint=store.RequestFingerprint(f"POST /v1/generation/{model_path}", target_sha256),
        content_type=content_type,
        declared_length=_declared_length(headers, max_bytes),
        body=RequestBody(receive, max_bytes, hashing=idempotency_key is not None),
    )


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


async def _check_quota(ctx: ApiContext, key_id: str) -> None:
    """429 `quota_exceeded` before anything is created upstream: once the upstream has
    created (and charged for) a generation, its subscription is never refused."""
    cap = ctx.settings.max_active_per_key
    if await store.active_subscriptions(ctx.db, key_id, cap) >= cap:
        raise ApiError(
            429,
            "quota_exceeded",
            f"this key already has {cap} active subscriptions (RELAY_MAX_ACTIVE_PER_KEY); "
            "nothing was created upstream",
        )


async def _subscription_target(ctx: ApiContext, headers: Mapping[str, bytes]) -> Any:
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
        except ApiError as exc:  # parse_object's words are about a body
            message = exc.message.replace("the body", "the header")
            details.append({"field": "Relay-Metadata", "message": message})
    try:
        checked = await checked_subscription(ctx, data)
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


def _idempotency_key(headers: Mapping[str, bytes]) -> str | None:
    raw = headers.get("idempotency-key")
    if raw is None:
        return None
    try:
        return _IDEMPOTENCY_KEY.validate_python(raw.decode("latin-1"))
    except ValidationError as exc:
        details = [
            {"field": "Idempotency-Key", "message": d["message"]} for d in pydantic_details(exc)
        ]
        raise validation_error(details) from None


def _content_type(headers: Mapping[str, bytes]) -> str:
    raw = headers.get("content-type", b"").decode("latin-1")
    if raw.partition(";")[0].strip().lower() not in FORWARDED_MEDIA_TYPES:
        raise ApiError(
            415,
            "unsupported_media_type",
            "the body must be application/json or multipart/form-data (the upstream's), "
            f"not {raw.strip()[:100]!r}; nothing was created upstream",
        )
    return raw


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
