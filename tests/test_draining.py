"""The Drainer's loop and close, on an in-memory source of work: no database, no sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from relay.batching import Batcher
from relay.draining import Drainer, DrainLimits
from tests.helpers import wait_for

DEADLINE_S = 5.0


class Source(Drainer[int, int]):
    """Claims ints from `due` (the claim can be held open with `claim_gate`); each item's
    work waits for its own gate."""

    def __init__(
        self, *, concurrency: int, per_round: int, close_timeout_s: float = DEADLINE_S
    ) -> None:
        self.written: list[int] = []
        self.write_gate = asyncio.Event()
        self.write_gate.set()
        records: Batcher[int, None] = Batcher(self._write)
        super().__init__(DrainLimits(concurrency, per_round, close_timeout_s), records, "test")
        self.records = records
        self.due: list[int] = []
        self.claims: list[tuple[int, list[int]]] = []  # (want, claimed)
        self.claim_gate = asyncio.Event()
        self.claim_gate.set()
        self.gates: dict[int, asyncio.Event] = {}
        self.done: list[int] = []
        self.finished: list[int] = []
        self.peak_in_flight = 0
        self.fail_next_claim = False

    def gate(self, item: int) -> asyncio.Event:
        return self.gates.setdefault(item, asyncio.Event())

    async def _claim_batch(self, want: int) -> list[int]:
        if self.fail_next_claim:
            self.fail_next_claim = False
            raise RuntimeError("claim failed")
        claimed, self.due = self.due[:want], self.due[want:]
        await self.claim_gate.wait()  # the claim has read the table; its answer is on its way
        self.claims.append((want, claimed))
        return claimed

    async def _start_batch(self, claimed: Sequence[int]) -> None:
        for item in claimed:
            self._spawn(item, self._work(item))
        self.peak_in_flight = max(self.peak_in_flight, len(self._in_flight))

    async def _work(self, item: int) -> None:
        await self.gate(item).wait()
        await self.records.submit(item)
        self.done.append(item)

    def _finished(self, key: int) -> None:
        self.finished.append(key)

    async def _write(self, items: Sequence[int]) -> list[None]:
        await self.write_gate.wait()
        self.written.extend(items)
        return [None] * len(items)

    def open_all(self) -> None:
        for item in [*self.due, *self.gates, *self._in_flight]:
            self.gate(item).set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)


async def settle() -> None:
    """Let every ready task run until nothing changes."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_drain_claims_until_a_claim_comes_back_short() -> None:
    """Claims are at most `per_round`; the drain ends on the first short claim."""
    source = Source(concurrency=10, per_round=3)
    source.due = list(range(6))
    source.open_all()
    async with asyncio.timeout(DEADLINE_S):
        await source.tick()
        await source.close()
    assert source.claims == [(3, [0, 1, 2]), (3, [3, 4, 5]), (3, [])]
    assert sorted(source.done) == list(range(6))
    assert sorted(source.written) == list(range(6))


async def test_a_drain_waits_for_a_freed_slot_and_never_exceeds_concurrency() -> None:
    """With every slot busy the drain waits; each finished item wakes it to claim again, and
    no wake-up is lost: the drain ends with everything claimed."""
    source = Source(concurrency=2, per_round=10)
    source.due = list(range(5))
    drain = asyncio.create_task(source.tick())
    async with asyncio.timeout(DEADLINE_S):
        for item in range(5):
            await settle()
            assert source.in_flight == min(2, 5 - item)
            source.gate(item).set()
        await drain
        await source.close()
    assert source.peak_in_flight == 2
    assert [want for want, _ in source.claims] == [2, 1, 1, 1, 1]
    assert source.done == list(range(5))


async def test_a_few_free_slots_wait_for_more_before_claiming() -> None:
    """While work is in flight, fewer than a quarter of the slots free is not worth a claim:
    one claim per freed slot would run the claim query per item."""
    source = Source(concurrency=8, per_round=8)
    source.due = list(range(12))
    drain = asyncio.create_task(source.tick())
    async with asyncio.timeout(DEADLINE_S):
        await settle()
        assert source.claims == [(8, list(range(8)))]
        source.gate(0).set()
        await settle()
        assert len(source.claims) == 1  # one free slot: wait for a second
        source.gate(1).set()
        await settle()
        assert source.claims[1] == (2, [8, 9])
        source.open_all()
        await drain
        await source.close()
    assert sorted(source.done) == list(range(12))


async def test_a_tick_during_a_drain_makes_it_look_once_more() -> None:
    """Work that arrives while a drain is claiming is drained by that drain, not left for the
    next scheduled tick; the second tick itself returns at once."""
    source = Source(concurrency=10, per_round=10)
    source.due = [1, 2]
    source.open_all()
    source.claim_gate.clear()
    first = asyncio.create_task(source.tick())
    async with asyncio.timeout(DEADLINE_S):
        await settle()  # the drain is inside its claim
        source.due.append(3)
        source.gate(3).set()
        await source.tick()  # returns at once: a drain is running
        assert source.claims == []
        source.claim_gate.set()
        await first
        await source.close()
    claimed = [item for _, items in source.claims for item in items]
    assert claimed == [1, 2, 3]
    assert sorted(source.done) == [1, 2, 3]


async def test_a_failed_drain_is_logged_and_the_next_tick_retries() -> None:
    """An error in a drain does not escape the tick nor leave the drainer stuck draining."""
    source = Source(concurrency=4, per_round=4)
    source.due = [1]
    source.open_all()
    source.fail_next_claim = True
    async with asyncio.timeout(DEADLINE_S):
        await source.tick()
        assert source.claims == []
        await source.tick()
        await source.close()
    assert source.done == [1]


async def test_close_waits_for_work_in_flight() -> None:
    """close() returns only after the work in flight has ended; each item's slot is freed
    and its end reported once."""
    source = Source(concurrency=4, per_round=4)
    source.due = [1, 2]
    async with asyncio.timeout(DEADLINE_S):
        await source.tick()
        closing = asyncio.create_task(source.close())
        await settle()
        assert not closing.done()
        source.gate(1).set()
        await settle()
        assert not closing.done()
        source.gate(2).set()
        await closing
    assert source.in_flight == 0
    assert sorted(source.finished) == [1, 2]
    assert sorted(source.done) == [1, 2] == sorted(source.written)


async def test_close_writes_the_records_still_batched() -> None:
    """close() returns only after every record submitted so far is written."""
    source = Source(concurrency=4, per_round=4)
    source.write_gate.clear()
    async with asyncio.timeout(DEADLINE_S):
        submitted = asyncio.create_task(source.records.submit(7))
        await settle()
        closing = asyncio.create_task(source.close())
        await settle()
        assert not closing.done(), "close returned before the records were written"
        source.write_gate.set()
        await closing
        assert submitted.done()
    assert source.written == [7]


async def test_close_wakes_a_drain_waiting_for_a_slot_and_stops_ticks() -> None:
    """A drain waiting for a slot ends at close without claiming; later ticks claim nothing."""
    source = Source(concurrency=1, per_round=1)
    source.due = [1, 2, 3]
    drain = asyncio.create_task(source.tick())
    async with asyncio.timeout(DEADLINE_S):
        await settle()
        closing = asyncio.create_task(source.close())
        await drain  # woken by close, though no slot was freed
        source.gate(1).set()
        await closing
        await source.tick()
    assert source.claims == [(1, [1])]
    assert source.due == [2, 3]


async def test_close_gives_up_on_work_that_outlasts_its_timeout() -> None:
    """Work still running after the close timeout is left to its lease: close returns."""
    source = Source(concurrency=2, per_round=2, close_timeout_s=0.1)
    source.due = [1]
    async with asyncio.timeout(DEADLINE_S):
        await source.tick()
        await source.close()
    assert source.in_flight == 1 and source.done == []
    source.gate(1).set()
    await wait_for(lambda: source.in_flight == 0, timeout_s=DEADLINE_S)
