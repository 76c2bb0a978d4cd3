"""Group commit: many concurrent callers, one transaction per batch.

Callers `await submit(item)`; while batches are being written the next accumulates, so under
load each transaction carries many items and at rest each item is written at once (no timer
adds latency). Up to `max_concurrent` batches are written at a time: 1 suits SQLite (one
writer), a few suit PostgreSQL, where a commit mostly waits for the WAL flush and several can
wait together. The relay uses it for subscription creates and for poll and attempt records:
this is how ingest beats a one-insert-per-request handler on the same database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar, cast

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    def __init__(
        self,
        handler: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        max_batch: int = 256,
        max_concurrent: int = 1,
    ) -> None:
        self._handler = handler
        self._max_batch = max_batch
        self._max_concurrent = max_concurrent
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._runners: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if len(self._runners) < self._max_concurrent:
            runner = asyncio.create_task(self._run())
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)  # should it never start
        return await future

    async def _run(self) -> None:
        try:
            await self._write_pending()
        finally:
            # Leave the set in the same step as the last look at `_pending`. A done callback
            # would run a loop turn later: a submit in between would see this runner still
            # counted, start none, and wait for some later submit to be written.
            self._runners.discard(cast("asyncio.Task[None]", asyncio.current_task()))

    async def _write_pending(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            try:
                results = await self._handler([item for item, _ in batch])
            except Exception as exc:
                if len(batch) == 1:
                    if not batch[0][1].done():
                        batch[0][1].set_exception(exc)
                    continue
                # One bad item must not fail its neighbours: write them one by one.
                await self._run_singly(batch)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def _run_singly(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        for item, future in batch:
            try:
                (result,) = await self._handler([item])
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
                continue
            if not future.done():
                future.set_result(result)

    async def drain(self) -> None:
        """Wait until everything submitted so far is written."""
        while self._runners:
            await asyncio.wait(set(self._runners))
