"""Who is calling: the bearer key, its rate limit, and whether it is live.

Routes ask here before anything else they do with a request; the answers are 401
`unauthorized` and 429 `rate_limited` in the contract's shape. Keys are only ever handled as
their SHA-256 hashes past `key_hash`. No route logic here, and nothing is logged about a key.
"""

from __future__ import annotations

from relay import store
from relay.database import Database
from relay.http import ApiError
from relay.ratelimit import KeyedLimiter


def unauthorized() -> ApiError:
    return ApiError(401, "unauthorized", "unknown or revoked API key")


class Authenticator:
    """The caller's key: parsed from Authorization, rate limited per key, checked live."""

    def __init__(self, db: Database, rate_limit_per_s: float) -> None:
        self._db = db
        self._limiter: KeyedLimiter | None = None
        if rate_limit_per_s > 0:
            self._limiter = KeyedLimiter(rate_limit_per_s, burst=max(1.0, 2 * rate_limit_per_s))

    def key_hash(self, authorization: str) -> str:
        """The hash of the bearer key in `authorization` (401 if none), within its rate (429)."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthorized", "send your API key as Authorization: Bearer <key>")
        key_hash = store.hash_api_key(token)
        self._check_rate(key_hash)
        return key_hash

    async def key_id(self, key_hash: str) -> str:
        """The id of the key, or 401 if it is unknown or revoked."""
        key_id = await store.authenticate(self._db, key_hash)
        if key_id is None:
            raise unauthorized()
        return key_id

    async def authenticate(self, authorization: str) -> str:
        """The caller's key id: 401 unless live, after the rate limit."""
        return await self.key_id(self.key_hash(authorization))

    def _check_rate(self, key_hash: str) -> None:
        if self._limiter is None:
            return
        wait_s = self._limiter.check(key_hash)
        if wait_s > 0:
            retry_after = str(max(1, int(wait_s + 0.999)))
            raise ApiError(
                429,
                "rate_limited",
                f"too many requests for this key; retry after {retry_after} s",
                headers={"retry-after": retry_after},
            )
