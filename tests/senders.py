"""A scripted CallbackSender for tests of the deliverer's scheduling: nothing is sent.

`create_app(settings, sender=ScriptedSender())` runs the real relay (API, poller, deliverer,
store) with the HTTP POST replaced: each call is recorded as a `Received` (as a real receiver
would see it, so signatures still verify with standardwebhooks) and answered from a script
per URL path. A receiver that hangs is an `Answer` whose delay reaches the attempt's timeout:
the sender then answers as AiohttpSender does on a timeout.

The relay runs on its own event loop (a uvicorn thread); tests read `received` from theirs,
which is safe for appends and reads of a list. Counters are touched by the relay's loop only.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from relay.addresses import receiver_host
from relay.sender import SendResult
from tests.helpers import Received


@dataclass(frozen=True)
class Answer:
    """What one POST comes to, after `delay_s` (capped by the attempt's timeout)."""

    status_code: int | None = 200
    error: str | None = None
    excerpt: str | None = "ok"
    retry_after: str | None = None
    delay_s: float = 0.0


HANG = Answer(delay_s=float("inf"))


class ScriptedSender:
    """Records every POST and answers from `scripts[path]`: each answer once, the last one
    for ever after (a path with no script answers 200)."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.timeouts_s: list[float] = []
        self.scripts: dict[str, list[Answer]] = {}
        self.in_flight: defaultdict[str, int] = defaultdict(int)  # per receiver host
        self.peak_in_flight: defaultdict[str, int] = defaultdict(int)
        self.closed = False

    def on(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float
    ) -> SendResult:
        path = urlsplit(url).path
        self.received.append(Received(path, dict(headers), body, time.time()))
        self.timeouts_s.append(timeout_s)
        script = self.scripts.get(path)
        answer = Answer()
        if script:
            answer = script.pop(0) if len(script) > 1 else script[0]
        host = receiver_host(url)
        self.in_flight[host] += 1
        self.peak_in_flight[host] = max(self.peak_in_flight[host], self.in_flight[host])
        try:
            if answer.delay_s >= timeout_s:
                await asyncio.sleep(timeout_s)
                return SendResult(status_code=None, error=f"timed out after {timeout_s:g} s")
            if answer.delay_s:
                await asyncio.sleep(answer.delay_s)
        finally:
            self.in_flight[host] -= 1
        return SendResult(
            status_code=answer.status_code,
            error=answer.error,
            excerpt=answer.excerpt,
            retry_after=answer.retry_after,
        )

    async def aclose(self) -> None:
        self.closed = True
