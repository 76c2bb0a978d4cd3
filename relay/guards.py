"""ASGI wrappers around the whole app that no single route can provide.

- `LastResort`: an exception no handler answered is logged (with its traceback the first
  time for each kind, one line after that) and answered 500 `internal_error` in the
  contract's error shape, so a client never sees a bare server error page and the log is not
  flooded by a client who found a way to repeat one.
- `BodyDeadline`: a request body must arrive within `timeout_s` of the request's start, plus
  one second for every `BODY_MIN_RATE` bytes received, or the request is answered 408
  `request_timeout`: a client trickling its body cannot hold a connection and a handler for
  as long as it likes, while a large upload on a slow link (a proxied create may carry 100
  MiB) is not cut off.

No route logic here; the answers are http.py's `ApiError` shapes.
"""

from __future__ import annotations

import asyncio
import logging
import traceback

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay.http import ApiError, error_response

logger = logging.getLogger(__name__)

_SEEN_MAX = 256  # kinds of failure whose traceback has been logged; bounded
# Bytes of body that buy one more second past the deadline: 64 KiB/s, a slow mobile uplink.
# A trickle below it gains almost nothing; 100 MiB at exactly this rate takes 27 minutes.
BODY_MIN_RATE = 64 * 1024


class LastResort:
    """Answer 500 in the error shape when nothing else answered an exception."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._seen: set[tuple[str, str]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watching(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watching)
        except Exception as exc:
            self._log(scope, exc)
            if started:
                return  # too late for an answer: the server closes the connection
            answer = error_response(
                ApiError(500, "internal_error", "the relay failed to answer this request")
            )
            await answer(scope, receive, send)

    def _log(self, scope: Scope, exc: Exception) -> None:
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        kind = (type(exc).__name__, where)
        method, path = scope.get("method", "?"), scope.get("path", "?")
        if kind in self._seen:
            logger.error("unexpected %s answering %s %s (at %s)", kind[0], method, path, where)
            return
        if len(self._seen) < _SEEN_MAX:
            self._seen.add(kind)
        logger.error("unexpected error answering %s %s", method, path, exc_info=exc)


class BodyDeadline:
    """Refuse with 408 a request whose body has not fully arrived `timeout_s` after it began,
    the deadline moving later by one second per BODY_MIN_RATE bytes received."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done, deadline
            if body_done:
                # Past the body only a disconnect can come, and waiting for it is no abuse.
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise ApiError(
                    408,
                    "request_timeout",
                    f"the request body did not arrive within {self.timeout_s:g} s, plus one"
                    f" second per {BODY_MIN_RATE // 1024} KiB received",
                    headers={"connection": "close"},
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            else:
                deadline += len(message.get("body", b"")) / BODY_MIN_RATE
            return message

        await self.app(scope, timed_receive, send)
