"""Drains: claim due work in rounds, one task per item, a tick never lost, a clean close.

The poller and the deliverer each drain due work from the database the same way, and this
module is that way:

- `tick()` runs one drain at a time. A tick that arrives while a drain runs (a kick from new
  work, or the scheduler) makes that drain look once more when it ends, instead of being
  dropped: work committed after the drain's last claim would otherwise wait for the next
  scheduled tick.
- A drain claims while there is room: it waits for a freed slot when there is none (or too
  few to be worth a claim while work is in flight), claims at most `min(free, per_round)`,
  starts what it claimed, and ends when a claim comes back short (nothing more is due).
- `close()` stops claiming, wakes a drain waiting for a slot, lets the work in flight finish
  (up to a timeout: leases cover a crash anyway) and writes the records still batched.

What is claimed, how it is started and what it does are the subclass's (`_claim_batch`,
`_start_batch`, `_spawn`); this module knows no table, no store call and no network.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from relay.batching import Batcher
from relay.outages import Outage, report_failure

logger = logging.getLogger(__name__)

CLAIM_BATCH_MAX = 200

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


@dataclass(frozen=True)
class DrainLimits:
    """How much one drain may hold: items in flight at once, items per claim, and how long
    close() waits for the work in flight."""

    concurrency: int
    per_round: int
    close_timeout_s: float

    @property
    def min_claim(self) -> int:
        # Claim in batches: one claim per freed slot would run the claim query per item.
        return max(1, min(self.per_round, self.concurrency) // 4)


class Drainer(Generic[K, T]):
    """Base of Poller and Deliverer: items of type T, in flight under keys of type K."""

    work = "work"  # what the items are, in log lines ("polls", "callbacks")

    def __init__(
        self,
        limits: DrainLimits,
        records: Batcher[Any, Any],
        owner: str,
        outage: Outage | None = None,
    ) -> None:
        self._outage = outage  # the database's: a failed round during an outage is counted
        self._owner = owner  # the node whose name the claims' leases carry
        self._draining: asyncio.Task[Any] | None = None  # the tick running a drain
        self._again = False
        self._closing = False
        self._limits = limits
        self._batched_records = records
        self._in_flight: dict[K, asyncio.Task[None]] = {}
        self._slot_freed = asyncio.Event()

    async def tick(self) -> None:
        if self._closing:
            return
        if self._draining is not None:
            self._again = True
            return
        self._draining = asyncio.current_task()
        try:
            while True:
                self._again = False
                await self._drain()
                if not self._again or self._closing:
                    break
        except Exception as exc:
            report_failure(
                logger,
                exc,
                self._outage,
                f"rounds of {self.work}",
                "%s tick failed; the next tick retries",
                type(self).__name__,
            )
        finally:
            self._draining = None

    async def _drain(self) -> None:
        while not self._closing:
            free = self._limits.concurrency - self._slots_taken()
            if free <= 0 or (free < self._limits.min_claim and self._in_flight):
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            want = await self._claim_budget(min(free, self._limits.per_round))
            if self._closing:  # closed while waiting for the budget: claim nothing more
                return
            claimed = await self._claim_batch(want)
            await self._start_batch(claimed)
            if len(claimed) < want:
                return

    def _slots_taken(self) -> int:
        """Slots of `concurrency` in use: those in flight, and any the subclass holds."""
        return len(self._in_flight)

    async def _claim_budget(self, want: int) -> int:
        """How many of `want` to claim now (the poller waits for its rate: what it claims, it
        polls at once, so work claimed never queues behind other work in memory)."""
        return want

    async def _claim_batch(self, want: int) -> Sequence[T]:
        """Lease up to `want` due items."""
        raise NotImplementedError

    async def _start_batch(self, claimed: Sequence[T]) -> None:
        """Start (with `_spawn`), hold or give back each claimed item."""
        raise NotImplementedError

    def _spawn(self, key: K, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` as a task in flight under `key`; its slot is freed when it ends."""
        self._in_flight[key] = asyncio.create_task(self._run(key, work))

    async def _run(self, key: K, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        finally:
            self._in_flight.pop(key, None)
            self._finished(key)
            self._slot_freed.set()

    def _finished(self, key: K) -> None:
        """The work under `key` has ended (whatever its outcome)."""

    async def _give_back_held(self) -> None:
        """Give back what is held but not in flight, before waiting for what is."""

    async def close(self) -> None:
        """Stop claiming; let the round under way and the work in flight finish; write the
        records still batched. Nothing of this drainer is left touching the database after."""
        self._closing = True
        self._slot_freed.set()
        if self._draining is not None and self._draining is not asyncio.current_task():
            # A round may be mid-claim: its leased items are started (or held) before the
            # work in flight is collected below.
            await asyncio.wait([self._draining], timeout=self._limits.close_timeout_s)
        await self._give_back_held()
        tasks = list(self._in_flight.values())
        if tasks:
            await asyncio.wait(tasks, timeout=self._limits.close_timeout_s)
        await self._batched_records.drain()
