"""Timers: one heap of (due time, callback, argument) and one asyncio task that fires them in
order. Webhook events, delayed webhook sends and SSE streams all wait here, so 100,000
generations or thousands of open streams cost heap entries, not tasks or busy loops.

Times are time.monotonic(). Callbacks run on the serving loop and must be quick and
synchronous (enqueue work, resolve a future); one that raises is logged and skipped.
`call_at` may be called from another thread (tests drive the simulator in-process while
uvicorn serves it in a thread): it then hands the entry to the loop. It must not know what
the callbacks do.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

Callback = Callable[[Any], None]
_BATCH = 1000  # entries fired before yielding to the loop once


class Timers:
    """A heap of timers served by one task; `start` and `stop` run on the serving loop."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callback, Any]] = []
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread_id = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def start(self) -> None:
        """Start firing on the running loop (the app's lifespan calls this)."""
        self._loop = asyncio.get_running_loop()
        self._thread_id = threading.get_ident()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="simulator-timers")

    async def stop(self) -> None:
        task, self._task, self._loop = self._task, None, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def call_at(self, due_mono: float, callback: Callback, arg: Any) -> None:
        """Run `callback(arg)` on the serving loop at `due_mono` (at once if past)."""
        loop = self._loop
        if loop is not None and threading.get_ident() != self._thread_id:
            loop.call_soon_threadsafe(self._push, due_mono, callback, arg)
        else:
            self._push(due_mono, callback, arg)

    def clear(self) -> None:
        """Drop every pending timer."""
        self._heap.clear()

    def _push(self, due_mono: float, callback: Callback, arg: Any) -> None:
        entry = (due_mono, next(self._seq), callback, arg)
        heapq.heappush(self._heap, entry)
        if self._heap[0] is entry:
            self._wake.set()  # the sleeper waits for a later time

    async def _run(self) -> None:
        heap = self._heap
        while True:
            self._wake.clear()
            if not heap:
                await self._wake.wait()
                continue
            delay_s = heap[0][0] - time.monotonic()
            if delay_s > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay_s):
                        await self._wake.wait()
                continue
            now = time.monotonic()
            for _ in range(_BATCH):
                if not heap or heap[0][0] > now:
                    break
                _, _, callback, arg = heapq.heappop(heap)
                try:
                    callback(arg)
                except Exception:
                    logger.exception("simulator timer callback failed")
            await asyncio.sleep(0)
