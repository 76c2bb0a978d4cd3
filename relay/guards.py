"""The ASGI wrapper around the whole app, for what no single route can provide:

- the last resort: an exception no handler answered is logged (with its traceback the first
  time for each kind, one line after that) and answered 500 `internal_error` in the
  contract's error shape, so a client never sees a bare server error page and the log is not
  flooded by a client who found a way to repeat one;
- the body deadline: a request body must arrive within `body_timeout_s` of the request's
  start, plus one second for every `BODY_MIN_RATE` bytes received, or the request is answered
  408 `request_timeout`: a client trickling its body cannot hold a connection and a handler
  for as long as it likes, while a large upload on a slow link (a proxied create may carry
  100 MiB) is not cut off.

One layer, and cheap per request (the create path runs it thousands of times a second): no
wrapped `send`, and one timer per request body rather than an `asyncio.timeout` per receive
(what the two wrappers this replaced spent showed in the ingest profile). No route logic here; the
answers are http.py's `ApiError` shapes.
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


class Guard:
    """The last-resort 500 and the body deadline around `app`."""

    def __init__(self, app: ASGIApp, body_timeout_s: float) -> None:
        self.app = app
        self.body_timeout_s = body_timeout_s
        self._seen: set[tuple[str, str]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _BodyDeadline(receive, self.body_timeout_s)
        try:
            await self.app(scope, body.receive, send)
        except Exception as exc:
            self._log(scope, exc)
            answer = error_response(
                ApiError(500, "internal_error", "the relay failed to answer this request")
            )
            try:
                await answer(scope, receive, send)
            except RuntimeError:
                # uvicorn refuses a second response start: the response had begun, too late
                # for an answer, and the server closes the connection.
                return
        finally:
            body.close()

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


class _BodyDeadline:
    """One request's `receive`, refusing with 408 a body that is late.

    Only time spent waiting in `receive` can run out: a handler busy between two receives (the
    proxy forwarding a chunk, the key check before the body) is never interrupted, and a body
    already buffered by the server is taken even past the deadline (the timer, armed for a
    moment already past, fires only if `receive` has to wait). The timer is armed once and
    re-armed only when it fires early (the deadline moved) or fired while nobody waited."""

    __slots__ = ("_deadline", "_loop", "_receive", "_state", "_task", "_timeout_s", "_timer")

    def __init__(self, receive: Receive, timeout_s: float) -> None:
        self._receive = receive
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.time() + timeout_s
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[object] | None = None  # the task waiting in receive
        self._state = "reading"  # then "waiting" (in receive), "late", "done"

    async def receive(self) -> Message:
        if self._state == "done":
            # Past the body only a disconnect can come, and waiting for it is no abuse.
            return await self._receive()
        task = asyncio.current_task()
        assert task is not None  # ASGI receives are awaited in a task
        self._task = task
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._expire)
        self._state = "waiting"
        try:
            message = await self._receive()
        except asyncio.CancelledError:
            if self._state == "late" and task.uncancel() == 0:
                raise self._late() from None
            raise
        finally:
            self._state = "reading"
        if message["type"] != "http.request" or not message.get("more_body", False):
            self._state = "done"
            self.close()
        else:
            self._deadline += len(message.get("body", b"")) / BODY_MIN_RATE
        return message

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._state != "waiting":
            return  # the next receive arms it again, for a moment already past
        if self._loop.time() < self._deadline:  # the body moved it: wait for the new one
            self._timer = self._loop.call_at(self._deadline, self._expire)
            return
        self._state = "late"
        if self._task is not None:
            self._task.cancel()

    def _late(self) -> ApiError:
        return ApiError(
            408,
            "request_timeout",
            f"the request body did not arrive within {self._timeout_s:g} s, plus one second"
            f" per {BODY_MIN_RATE // 1024} KiB received",
            headers={"connection": "close"},
        )
