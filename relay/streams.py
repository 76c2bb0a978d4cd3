"""Following the upstream's event streams, so a generation created through the relay needs no
per-id poll until its final GET.

With RELAY_UPSTREAM_SSE=true a create through the relay opens the upstream's streaming
create; its first event is the client's answer (proxy.py), and the open stream is handed
here. While a stream is followed its generation's poll is held off under a lease this process
renews (store/streams.py). A final event makes the generation due at once: the poller's
GET fetches the result, and the callback carries the GET's body, never an event's. A stream
that ends early, fails, or stays silent for SILENCE_S no longer holds polls off: the
generation goes back to the normal schedule. If this process dies, the lease runs out and
polling resumes by itself.

A stream costs its connection and a few small objects (ssecreate.py), and no task of its
own: it calls this follower back as events arrive, so a process follows thousands. It must
not write SQL (the store does) nor take a result from an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson

from relay import store
from relay.batching import Batcher
from relay.creator import OpenStream
from relay.database import Database
from relay.statuses import FINAL_STATUSES, normalize_status

logger = logging.getLogger(__name__)

# A stream silent this long stops holding its generation's polls off: its peer may be gone
# without a word (no TCP reset reaches us), and polling is the safety net.
SILENCE_S = 300.0


def is_final_event(data: bytes) -> bool:
    """Whether an event's object has a final status (pure)."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    status = event.get("status") if isinstance(event, dict) else None
    return isinstance(status, str) and normalize_status(status) in FINAL_STATUSES


@dataclass(slots=True)
class _Followed:
    stream: OpenStream
    last_event_at: float  # monotonic


class StreamFollower:
    """The streams this process follows; `owner` names it on the leases it holds. Streams
    call it back (`event`, `ended`: a StreamListener) as their data arrives."""

    def __init__(
        self,
        db: Database,
        owner: str,
        lease_s: float,
        on_polls_queued: Callable[[], None] = lambda: None,
    ) -> None:
        self._db = db
        self.owner = owner
        self._lease_s = lease_s
        self.on_polls_queued = on_polls_queued
        self._followed: dict[str, _Followed] = {}
        self._ended: Batcher[str, None] = Batcher(self._write_ended)
        self._releasing: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._closing = False

    def __len__(self) -> int:
        return len(self._followed)

    def follow(self, generation_id: str, stream: OpenStream) -> None:
        """Follow `stream` until its generation's final event (or its end)."""
        if self._closing or generation_id in self._followed:
            stream.close()
            return
        self._followed[generation_id] = _Followed(stream, time.monotonic())
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew())
        stream.listen(self, generation_id)

    def event(self, key: str, data: bytes) -> None:
        followed = self._followed.get(key)
        if followed is None:
            return
        followed.last_event_at = time.monotonic()
        if is_final_event(data):
            self._end(key, final=True)

    def ended(self, key: str, error: BaseException | None) -> None:
        if error is not None:
            logger.info("stream of generation %s lost: %s", key, type(error).__name__)
        self._end(key, final=False)

    def _end(self, generation_id: str, *, final: bool) -> None:
        followed = self._followed.pop(generation_id, None)
        if followed is None or self._closing:
            return
        followed.stream.close()
        if not final:
            logger.info("stream of generation %s ended early; polling it resumes", generation_id)
        task = asyncio.get_running_loop().create_task(self._release(generation_id))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release(self, generation_id: str) -> None:
        try:
            await self._ended.submit(generation_id)
        except Exception:
            # Its lease runs out and polling resumes: nothing is lost, it only waits longer.
            logger.exception("could not end the stream lease of generation %s", generation_id)
            return
        self.on_polls_queued()

    async def _write_ended(self, ids: Sequence[str]) -> list[None]:
        await store.end_streams(self._db, self.owner, ids)
        return [None] * len(ids)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            quiet_since = time.monotonic() - SILENCE_S
            ids = [g for g, f in self._followed.items() if f.last_event_at > quiet_since]
            try:
                await store.renew_stream_leases(self._db, self.owner, ids, self._lease_s)
            except Exception:
                logger.exception("renewing stream leases failed; retried next round")

    async def close(self) -> None:
        """Stop following: every followed generation is due at once, for polls to take on."""
        self._closing = True
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        followed, self._followed = self._followed, {}
        for each in followed.values():
            each.stream.close()
        if self._releasing:
            await asyncio.wait(self._releasing, timeout=5)
        await self._ended.drain()
        if followed:
            try:
                await store.end_streams(self._db, self.owner, list(followed))
            except Exception:
                logger.exception("could not end stream leases at shutdown; they run out")
