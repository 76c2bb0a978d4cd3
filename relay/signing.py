"""Standard Webhooks signing: secrets, message ids and `webhook-signature` values.

This module owns the wire format of callback signatures as the Standard Webhooks
specification defines it (https://www.standardwebhooks.com/): a secret is `whsec_` followed
by base64 of the key bytes, and a signature is `v1,` followed by base64 of
HMAC-SHA256(key, f"{webhook-id}.{webhook-timestamp}.{body}").

It is pure apart from reading randomness and the clock for new secrets and ids: it must not
read the environment, the database or the network, and must not log (its inputs are secrets).
Verification is deliberately absent: tests verify with the independent `standardwebhooks`
package, so the relay's signer never checks itself.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
from collections.abc import Sequence
from secrets import token_bytes

from relay.ids import new_id

__all__ = [
    "SECRET_PREFIX",
    "generate_secret",
    "new_message_id",
    "sign",
    "sign_all",
]

SECRET_PREFIX = "whsec_"
_SECRET_BYTES = 32


def generate_secret() -> str:
    """Return a new signing secret: `whsec_` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(token_bytes(_SECRET_BYTES)).decode("ascii")


# Signing runs for every callback attempt; decoding the same few secrets again each time is
# wasted work, so the decoded keys are kept. Bounded so rotated-out secrets age away.
@functools.lru_cache(maxsize=1024)
def _key_bytes(secret: str) -> bytes:
    encoded = secret.removeprefix(SECRET_PREFIX)
    # Other Standard Webhooks libraries accept unpadded base64, so this one does too.
    padded = encoded + "=" * (-len(encoded) % 4)
    try:
        key = base64.b64decode(padded, validate=True)
    except binascii.Error:
        raise ValueError("signing secret is not valid base64 after its whsec_ prefix") from None
    if not key:
        raise ValueError("signing secret is empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the `v1,<base64>` signature of one message with one secret."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.digest(_key_bytes(secret), signed, "sha256")
    return "v1," + base64.b64encode(digest).decode("ascii")


def sign_all(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the `webhook-signature` value: one signature per secret, space separated.

    Several secrets are used while a secret is being rotated, so receivers holding either
    the old or the new secret can verify.
    """
    if isinstance(secrets, str):
        # A bare string is a Sequence[str] of characters: almost certainly a caller mistake.
        raise TypeError("sign_all() takes a sequence of secrets, not a single secret string")
    if not secrets:
        raise ValueError("sign_all() needs at least one secret")
    return " ".join(sign(secret, msg_id, timestamp, body) for secret in secrets)


def new_message_id() -> str:
    """Return a new `webhook-id`: `msg_` + a 26-character ULID (time-sortable, unique)."""
    return new_id("msg")
