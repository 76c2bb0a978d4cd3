"""Idempotency-Key of creates through the relay, the API's side: who creates, who waits, and
what a retry is told.

The first request with a key claims it in the database (store/idempotency.py) and holds it
under a lease it renews while the upstream works (`IdempotencyGate.holding`). A request that
finds the key taken waits until the holder settles it (woken at once in the same process, by
reading the row with backoff across processes), for at most WAIT_MAX_S; then `rule` compares
what it sent with what the first sent and says what it gets. A key still in progress whose
lease ran out lost its holder between the upstream's answer and the commit (or earlier): the
outcome is unknown, and nothing is ever created again under that key.

No HTTP here (proxy.py turns rulings into answers) and no SQL (the store).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum

from relay import store
from relay.database import Database
from relay.models import IdempotencyState

logger = logging.getLogger(__name__)

WAIT_MAX_S = 60.0  # how long a duplicate waits for the request holding its key
_POLL_FIRST_S, _POLL_MAX_S = 0.05, 0.5  # reading the row while another process holds it


class Verdict(StrEnum):
    REPLAY = "replay"  # the first answer, again
    MISMATCH = "mismatch"  # the key was first used for another request
    IN_PROGRESS = "in_progress"  # the first is still running, or ended creating nothing
    OUTCOME_UNKNOWN = "outcome_unknown"  # the first's holder died: never create again


@dataclass(frozen=True)
class Ruling:
    verdict: Verdict
    answer: store.StoredAnswer | None = None
    differs: str | None = None  # what differs, for a mismatch


def differs(first: store.RequestFingerprint, this: store.RequestFingerprint) -> str | None:
    """What of `this` request is not what the key was first used for (pure)."""
    if first.request != this.request:
        return "method and path"
    if first.target_sha256 != this.target_sha256:
        return "Relay-Callback-Url or Relay-Metadata"
    return None


def rule(
    record: store.IdempotencyRecord | None,
    fingerprint: store.RequestFingerprint,
    body_sha256: str | None,
) -> Ruling:
    """What a request finding its key taken gets, once it waited (pure)."""
    if record is None:  # pruned meanwhile: the next try claims it afresh
        return Ruling(Verdict.IN_PROGRESS)
    what = differs(record.fingerprint, fingerprint)
    if what is not None:
        return Ruling(Verdict.MISMATCH, differs=what)
    if record.state == IdempotencyState.IN_PROGRESS:
        return Ruling(Verdict.OUTCOME_UNKNOWN if record.lapsed else Verdict.IN_PROGRESS)
    if record.body_sha256 is not None and record.body_sha256 != body_sha256:
        return Ruling(Verdict.MISMATCH, differs="body")
    if record.answer is None:  # released by a client that left: nothing to repeat
        return Ruling(Verdict.IN_PROGRESS)
    return Ruling(Verdict.REPLAY, answer=record.answer)


class IdempotencyGate:
    """Claims, holds and waits for Idempotency-Keys on behalf of this process (`owner`)."""

    def __init__(self, db: Database, owner: str, lease_s: float) -> None:
        self._db = db
        self._owner = owner
        self._lease_s = lease_s
        # Keys this process holds: duplicates here wait on the event, not on the database.
        self._held: dict[tuple[str, str], asyncio.Event] = {}

    def ref(self, key_id: str, idempotency_key: str) -> store.IdempotencyRef:
        return store.IdempotencyRef(key_id, idempotency_key, self._owner)

    async def claim(
        self, ref: store.IdempotencyRef, fingerprint: store.RequestFingerprint
    ) -> store.IdempotencyRecord | None:
        """None when this request now holds the key; else the key as another left it."""
        return await store.claim_idempotency_key(self._db, ref, fingerprint, self._lease_s)

    @contextlib.asynccontextmanager
    async def holding(self, ref: store.IdempotencyRef) -> AsyncIterator[None]:
        """Keep the claimed key's lease alive while the body runs; wake this process's
        duplicates when it ends (settled or not: they read what the database says)."""
        settled = asyncio.Event()
        self._held[(ref.key_id, ref.idempotency_key)] = settled
        renewer = asyncio.create_task(self._renew(ref))
        try:
            yield
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            self._held.pop((ref.key_id, ref.idempotency_key), None)
            settled.set()

    async def _renew(self, ref: store.IdempotencyRef) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                if not await store.renew_idempotency_key(self._db, ref, self._lease_s):
                    logger.warning("Idempotency-Key lease of key %s was lost", ref.key_id)
                    return
            except Exception:
                # Retried next round; a lease that runs out meanwhile reads as a dead holder.
                logger.exception("renewing an Idempotency-Key lease failed")

    async def wait(
        self, ref: store.IdempotencyRef, record: store.IdempotencyRecord
    ) -> store.IdempotencyRecord | None:
        """The key's row once its holder settled it, or lost it, or WAIT_MAX_S passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_MAX_S
        poll_s = _POLL_FIRST_S
        current: store.IdempotencyRecord | None = record
        while (
            current is not None
            and current.state == IdempotencyState.IN_PROGRESS
            and not current.lapsed
        ):
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                break
            held_here = self._held.get((ref.key_id, ref.idempotency_key))
            if held_here is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(held_here.wait(), min(remaining_s, 1.0))
            else:
                await asyncio.sleep(min(remaining_s, poll_s))
                poll_s = min(poll_s * 1.5, _POLL_MAX_S)
            current = await store.read_idempotency_key(self._db, ref)
        return current
