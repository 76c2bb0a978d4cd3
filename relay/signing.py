"""Standard Webhooks signing: secrets, message ids and `webhook-signature` values.

This module owns the wire format of callback signatures as the Standard Webhooks
specification defines it (https://www.standardwebhooks.com/): a secret is `whsec_` followed
by base64 of the key bytes, and a signature is `v1,` followed by base64 of
HMAC-SHA256(key, f"{webhook-id}.{webhook-timestamp}.{body}").

It also verifies what the upstream signs (its workspace webhooks, relay's push hints) with
any of several secrets, tolerant of malformed headers: a stranger's request must end in a
refusal, never an exception. Tests check both directions against the independent
`standardwebhooks` package, so the relay's signer never checks only itself.

It is pure apart from reading randomness for new secrets and ids: it must not read the
environment, the database or the network, and must not log (its inputs are secrets).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
from collections.abc import Mapping, Sequence
from secrets import token_bytes

from relay.ids import new_id

__all__ = [
    "SECRET_PREFIX",
    "SignatureError",
    "check_secret",
    "generate_secret",
    "new_message_id",
    "sign",
    "sign_all",
    "verify",
]

SECRET_PREFIX = "whsec_"
_SECRET_BYTES = 32
TOLERANCE_S = 300  # Standard Webhooks: a timestamp more than 5 minutes away is refused
_MAX_SIGNATURES = 16  # a header with more is not a rotation, it is someone guessing


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


def check_secret(secret: str) -> None:
    """Raise ValueError (without the secret in it) unless `secret` is a usable whsec_ secret."""
    _key_bytes(secret)


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


class SignatureError(ValueError):
    """A signed request that does not verify; str() says why, without any secret."""


def verify(
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    now_unix: float,
    tolerance_s: float = TOLERANCE_S,
) -> str:
    """Check Standard Webhooks headers against `body` with any of `secrets`; return the
    `webhook-id`. Raises SignatureError for a missing or malformed header, a timestamp more
    than `tolerance_s` from `now_unix`, or no signature that matches."""
    msg_id = headers.get("webhook-id", "")
    raw_timestamp = headers.get("webhook-timestamp", "")
    raw_signatures = headers.get("webhook-signature", "")
    if not (msg_id and raw_timestamp and raw_signatures):
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature")
    if not (raw_timestamp.isascii() and raw_timestamp.isdigit() and len(raw_timestamp) <= 12):
        raise SignatureError("webhook-timestamp is not a Unix time in seconds")
    timestamp = int(raw_timestamp)
    if abs(now_unix - timestamp) > tolerance_s:
        raise SignatureError("webhook-timestamp is more than 5 minutes from now")
    offered = []
    for part in raw_signatures.split(" ")[:_MAX_SIGNATURES]:
        version, _, encoded = part.partition(",")
        if version != "v1":
            continue
        try:
            offered.append(base64.b64decode(encoded, validate=True))
        except binascii.Error:
            continue
    # Signed over the header as sent, not as parsed: a sender's "0123" is not "123".
    signed = f"{msg_id}.{raw_timestamp}.".encode() + body
    for secret in secrets:
        expected = hmac.digest(_key_bytes(secret), signed, "sha256")
        if any(hmac.compare_digest(expected, candidate) for candidate in offered):
            return msg_id
    raise SignatureError("no signature matches")
