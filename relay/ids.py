"""Identifiers: prefixed, time-sortable, unguessable (`sub_01JD...`, ULID-like).

Sorting by id is sorting by creation time (to the millisecond), which is what list pagination
relies on; 80 random bits make ids unguessable across keys.
"""

from __future__ import annotations

import os
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_id(prefix: str) -> str:
    """`prefix_` + 26 Crockford base32 characters: 48-bit milliseconds, then 80 random bits."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"
