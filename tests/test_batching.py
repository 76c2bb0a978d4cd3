"""Batcher, the group commit: an in-memory handler stands in for the transaction."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from relay.batching import Batcher

DEADLINE_S = 5.0


class Handler:
    """Writes batches of ints (x -> 10x); fails any batch holding a negative item; each
    call waits for `gate`, so a test can hold a batch open while the next accumulates."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.running = 0
        self.peak_running = 0

    async def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        if any(item < 0 for item in items):
            raise ValueError(f"bad items in {list(items)}")
        return [item * 10 for item in items]


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_an_item_at_rest_is_written_at_once_alone() -> None:
    """With nothing being written, a submit is a batch of one, with no timer in between."""
    handler = Handler()
    batcher = Batcher(handler)
    async with asyncio.timeout(DEADLINE_S):
        assert await batcher.submit(4) == 40
    assert handler.batches == [[4]]


async def test_a_submit_right_after_a_write_is_written_too() -> None:
    """A caller that submits again as soon as its first result comes is not left waiting for
    someone else's submit: the runner that wrote the first is no longer counted."""
    handler = Handler()
    batcher = Batcher(handler)
    async with asyncio.timeout(DEADLINE_S):
        assert await batcher.submit(1) == 10
        assert await batcher.submit(2) == 20
        with pytest.raises(ValueError):
            await batcher.submit(-3)
        assert await batcher.submit(4) == 40
    assert handler.batches == [[1], [2], [-3], [4]]


async def test_items_arriving_during_a_write_share_the_next_batch() -> None:
    """While a batch is being written the next accumulates: one handler call for all of
    them, each caller getting its own result."""
    handler = Handler()
    handler.gate.clear()
    batcher = Batcher(handler)
    async with asyncio.timeout(DEADLINE_S):
        first = asyncio.create_task(batcher.submit(1))
        await settle()
        rest = [asyncio.create_task(batcher.submit(n)) for n in range(2, 7)]
        await settle()
        assert handler.batches == [[1]]
        handler.gate.set()
        assert await first == 10
        assert [await task for task in rest] == [20, 30, 40, 50, 60]
    assert handler.batches == [[1], [2, 3, 4, 5, 6]]


async def test_batches_are_at_most_max_batch() -> None:
    """A backlog larger than max_batch is written in several batches, in order."""
    handler = Handler()
    handler.gate.clear()
    batcher = Batcher(handler, max_batch=2)
    async with asyncio.timeout(DEADLINE_S):
        tasks = [asyncio.create_task(batcher.submit(n)) for n in range(5)]
        await settle()
        handler.gate.set()
        assert [await task for task in tasks] == [0, 10, 20, 30, 40]
    assert handler.batches == [[0, 1], [2, 3], [4]]


async def test_one_bad_item_does_not_fail_its_neighbours() -> None:
    """A batch that fails is written again item by item: the good items succeed, only the
    bad one's caller gets the error."""
    handler = Handler()
    handler.gate.clear()
    batcher = Batcher(handler)
    async with asyncio.timeout(DEADLINE_S):
        blocker = asyncio.create_task(batcher.submit(0))
        await settle()
        tasks = [asyncio.create_task(batcher.submit(n)) for n in (1, -2, 3)]
        await settle()
        handler.gate.set()
        await blocker
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], ValueError)
    assert handler.batches == [[0], [1, -2, 3], [1], [-2], [3]]


async def test_a_lone_bad_item_fails_only_its_caller() -> None:
    """A failing batch of one raises to its caller, and later items are still written."""
    handler = Handler()
    batcher = Batcher(handler)
    async with asyncio.timeout(DEADLINE_S):
        with pytest.raises(ValueError):
            await batcher.submit(-1)
        assert await batcher.submit(2) == 20
    assert handler.batches == [[-1], [2]]


@pytest.mark.parametrize("max_concurrent", [1, 2])
async def test_at_most_max_concurrent_batches_are_written_at_once(max_concurrent: int) -> None:
    """Up to max_concurrent handler calls run together (1 suits SQLite's single writer);
    an item submitted beyond that waits for a writer to come free."""
    handler = Handler()
    handler.gate.clear()
    batcher = Batcher(handler, max_concurrent=max_concurrent)
    async with asyncio.timeout(DEADLINE_S):
        tasks = []
        for n in range(4):
            tasks.append(asyncio.create_task(batcher.submit(n)))
            await settle()
        assert handler.running == max_concurrent
        handler.gate.set()
        assert [await task for task in tasks] == [0, 10, 20, 30]
    assert handler.peak_running == max_concurrent
    assert sorted(n for batch in handler.batches for n in batch) == [0, 1, 2, 3]


async def test_drain_waits_until_everything_submitted_is_written() -> None:
    """drain() returns once every item submitted before it has been written."""
    handler = Handler()
    handler.gate.clear()
    batcher = Batcher(handler, max_concurrent=2)
    async with asyncio.timeout(DEADLINE_S):
        tasks = [asyncio.create_task(batcher.submit(n)) for n in range(3)]
        await settle()
        draining = asyncio.create_task(batcher.drain())
        await settle()
        assert not draining.done()
        handler.gate.set()
        await draining
        assert all(task.done() for task in tasks)
        await batcher.drain()  # nothing pending: returns at once
    assert sorted(n for batch in handler.batches for n in batch) == [0, 1, 2]
