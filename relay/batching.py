"""Group commit: many concurrent callers, one transaction per batch.

Callers `await submit(item)`; while one batch is being written the next accumulates, so under
load each transaction carries many items and at rest each item is written at once (no timer
adds latency). The relay uses it for subscription creates and delivery attempt records: this
is how ingest beats a one-insert-per-request handler on the same database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger(__name__)


class Batcher(Generic[T, R]):
    def __init__(
        self, handler: Callable[[Sequence[T]], Awaitable[Sequence[R]]], max_batch: int = 256
    ) -> None:
        self._handler = handler
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            try:
                results = await self._handler([item for item, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def drain(self) -> None:
        """Wait until everything submitted so far is written."""
        while self._runner is not None and not self._runner.done():
            await asyncio.shield(self._runner)
