"""Who is calling: the bearer key, checked before anything else is done with a request.

Routes ask here first; the answers are 401 `unauthorized` and 429 `rate_limited` in the
contract's shape. The order is the contract's: the key is checked before the body is read,
so a made-up key costs one indexed lookup and nothing more (no parsing, no validation, no
DNS). Limits are keyed by what cannot be made up for free:

- a live key's rate limit is keyed by its id, after authentication, so made-up tokens never
  make buckets and cannot push a real key's bucket out of memory;
- requests with unknown or revoked keys are limited per client address
  (`RELAY_AUTH_FAILURE_LIMIT`); an address over that allowance gets 429 without a lookup for
  keys not seen live within the last second.

Live keys are cached by hash for at most KEY_CACHE_TTL_S, for the create hot path only: its
write transaction checks the key again, so a revoked key never creates anything, and every
other route looks the key up each time, so a revoked key is refused at once. On that hot path
the requests that miss the cache together share one lookup: when a busy key's entry expired,
each of a hundred creates in flight looked it up on its own, took a connection past the
pool's size and paid for a new one (PostgreSQL ingest was 15% slower). Keys are only ever
handled as SHA-256 hashes past `_hash`, and nothing here logs a key.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import Scope

from relay import store
from relay.database import Database
from relay.http import ApiError
from relay.ratelimit import KeyedLimiter

KEY_CACHE_TTL_S = 1.0
KEY_CACHE_MAX = 10_000


def unauthorized() -> ApiError:
    return ApiError(401, "unauthorized", "unknown or revoked API key")


def client_address(scope: Scope) -> str:
    """The peer's address, the unit of the unknown-key limit (no proxy headers are trusted)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller: the key's id, and its hash (what the create batch checks)."""

    key_id: str
    key_hash: str


class _LiveKeys:
    """Key hashes recently found live → key ids; bounded, entries expire after `ttl_s`."""

    def __init__(self, ttl_s: float, max_entries: int, clock: Callable[[], float]) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, key_hash: str) -> str | None:
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._entries[key_hash]
            return None
        return entry[0]

    def put(self, key_hash: str, key_id: str) -> None:
        self._entries.pop(key_hash, None)
        self._entries[key_hash] = (key_id, self._clock() + self._ttl_s)
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


class Authenticator:
    """The caller's key: parsed from Authorization, checked live, rate limited per key id;
    failures rate limited per client address."""

    def __init__(
        self,
        db: Database,
        rate_limit_per_s: float,
        auth_failure_limit_per_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._live = _LiveKeys(KEY_CACHE_TTL_S, KEY_CACHE_MAX, clock)
        self._limiter = _limiter(rate_limit_per_s)
        self._failures = _limiter(auth_failure_limit_per_s)
        # Cached-path lookups in flight, by key hash: later misses wait for the same answer.
        self._lookups: dict[str, asyncio.Future[str | None]] = {}

    async def authenticate(
        self, authorization: str, address: str, *, cached: bool = False
    ) -> Caller:
        """The caller, or 401 (no key, unknown or revoked) or 429 (over a limit).

        `cached`: a key seen live within KEY_CACHE_TTL_S is taken without a lookup (only for
        callers that check the key again where it matters, as the create batch does).
        """
        key_hash = _hash(authorization)
        key_id = self._live.get(key_hash)
        if key_id is None or not cached:
            if key_id is None:
                # An address over its allowance of failures is not worth a lookup.
                self._refuse_if_over(self._failures, address, "from this address")
            if cached:
                key_id = await self._shared_lookup(key_hash)
            else:
                key_id = await store.authenticate(self._db, key_hash)
            if key_id is None:
                self._count_failure(address)
                raise unauthorized()
            self._live.put(key_hash, key_id)
        self._refuse_if_over(self._limiter, key_id, "for this key", take=True)
        return Caller(key_id, key_hash)

    async def _shared_lookup(self, key_hash: str) -> str | None:
        """One lookup for every cached-path request that missed the cache meanwhile."""
        pending = self._lookups.get(key_hash)
        if pending is None:
            pending = asyncio.ensure_future(store.authenticate(self._db, key_hash))
            self._lookups[key_hash] = pending
            pending.add_done_callback(lambda done: self._lookup_done(key_hash, done))
        # shield: one waiter cancelled (its client went away) must not cancel the others'.
        return await asyncio.shield(pending)

    def _lookup_done(self, key_hash: str, done: asyncio.Future[str | None]) -> None:
        self._lookups.pop(key_hash, None)
        if not done.cancelled():
            done.exception()  # retrieved, so a failure every waiter left is not logged twice

    def _count_failure(self, address: str) -> None:
        self._refuse_if_over(self._failures, address, "with unknown or revoked keys", take=True)

    @staticmethod
    def _refuse_if_over(
        limiter: KeyedLimiter | None, key: str, whose: str, *, take: bool = False
    ) -> None:
        if limiter is None:
            return
        wait_s = limiter.check(key) if take else limiter.peek(key)
        if wait_s > 0:
            retry_after = str(max(1, int(wait_s + 0.999)))
            raise ApiError(
                429,
                "rate_limited",
                f"too many requests {whose}; retry after {retry_after} s",
                headers={"retry-after": retry_after},
            )


def _limiter(per_s: float) -> KeyedLimiter | None:
    return KeyedLimiter(per_s, burst=max(1.0, 2 * per_s)) if per_s > 0 else None


def _hash(authorization: str) -> str:
    """The hash of the bearer key in `authorization`, or 401 if there is none."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "send your API key as Authorization: Bearer <key>")
    return store.hash_api_key(token)
