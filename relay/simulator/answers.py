"""Prepared HTTP answers of the upstream surface: (status, headers, body) triples built once and
sent as they are by the raw ASGI paths, in the upstream's error shape
(`{"error": <legacy code>, "code": <machine code>, "message": <text>}`).

It must not hold state: everything here is immutable and shared by every request.
"""

from __future__ import annotations

import functools
from typing import Final

import orjson
from starlette.responses import Response
from starlette.types import Send

# (status code, headers, body): what one answer sends, built once and reused.
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


@functools.cache
def _header(name: bytes, value: bytes | int) -> tuple[bytes, bytes]:
    # Shared across the many cached answers, which mostly have the same few lengths.
    return name, value if isinstance(value, bytes) else str(value).encode()


def answer(status: int, body: bytes, content_type: bytes = b"application/json") -> Answer:
    headers = [_header(b"content-type", content_type), _header(b"content-length", len(body))]
    return status, headers, body


def error_answer(status: int, error: str, code: str, message: str) -> Answer:
    return answer(status, orjson.dumps({"error": error, "code": code, "message": message}))


def as_response(prepared: Answer) -> Response:
    """A prepared answer as a Starlette Response, for handlers behind the router."""
    status, headers, body = prepared
    extra = {k.decode(): v.decode() for k, v in headers if k not in (b"content-length",)}
    return Response(body, status_code=status, headers=extra)


async def send_answer(send: Send, prepared: Answer) -> None:
    status, headers, body = prepared
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def format_retry_after(seconds: float) -> bytes:
    # Whole seconds are what HTTP defines; fractions are sent as written so tests can be fast.
    return str(int(seconds)).encode() if seconds.is_integer() else repr(seconds).encode()


def rate_limited(retry_after_s: float | None) -> Answer:
    """A 429 in the upstream's shape, with Retry-After unless `retry_after_s` is None."""
    status, headers, body = answer(429, RATE_LIMITED_BODY)
    if retry_after_s is not None:
        headers.append((b"retry-after", format_retry_after(retry_after_s)))
    return status, headers, body


UNAUTHORIZED: Final = error_answer(
    401, "unauthorized", "UNAUTHORIZED", "Missing or invalid API key."
)
FORBIDDEN: Final = error_answer(403, "forbidden", "FORBIDDEN", "This API key has been revoked.")
NOT_FOUND: Final = error_answer(404, "not_found", "GENERATION_NOT_FOUND", "Generation not found.")
INVALID_BODY: Final = error_answer(
    400, "invalid_input", "INVALID_INPUT", "The body must be a JSON object."
)
SERVER_ERRORS: Final = (
    error_answer(500, "internal_error", "INTERNAL_ERROR", "Internal server error."),
    answer(
        502,
        b"<html><head><title>502 Bad Gateway</title></head>"
        b"<body><center><h1>502 Bad Gateway</h1></center></body></html>",
        b"text/html",
    ),
    error_answer(
        503,
        "service_unavailable",
        "PROVIDER_UNAVAILABLE",
        "The service is temporarily unavailable.",
    ),
)
RATE_LIMITED_BODY: Final = orjson.dumps(
    {"error": "rate_limited", "code": "RATE_LIMITED", "message": "Too many requests."}
)
MALFORMED_BODIES: Final = (
    b'{"id": "gen_truncated", "status": "COMPL',
    b"",
    b"<html><body>not json</body></html>",
    b'["not", "an", "object"]',
    b"null",
    b'"COMPLETED"',
)
