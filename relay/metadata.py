"""Metadata as clients send it: JSON text read with every number exactly as sent, and the
metadata rules (depth, 64-bit integers, finite numbers, size), defined once.

Pure: no I/O. The API validates `metadata` (and a create through the relay its
`Relay-Metadata` header) through schemas.Metadata, which calls `check_metadata`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic_core import PydanticCustomError

METADATA_MAX_BYTES = 4 * 1024
METADATA_MAX_DEPTH = 32  # levels of objects and arrays; the metadata object is level 1
# JSON numbers are arbitrary; metadata integers must fit a signed 64-bit integer, the widest
# most clients' JSON libraries read back without changing them.
METADATA_INT_MIN = -(2**63)
METADATA_INT_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class RefusedNumber:
    """A number that JSON allows and the metadata rules refuse (an integer outside signed 64
    bits, NaN, Infinity), kept where it stood so that validation names the field."""

    text: str
    why: str


def parse_json(text: bytes | str) -> Any:
    """JSON text as Python values, with every number exactly as sent or a RefusedNumber.

    orjson (the fast path) reads an integer beyond 64 bits as a float, changing it, and
    refuses NaN and Infinity as invalid JSON. So where its result holds a float, or it refused
    the text, the standard library reads the text again with hooks that keep such numbers as
    RefusedNumber; validation then answers 422 naming the field. Raises ValueError, with
    orjson's reason, for text that is not JSON.
    """
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        # Only to name a refused number: text orjson refuses for any other reason (a lone
        # surrogate, bad UTF-8) stays refused even where the standard library would take it.
        strict = _parse_keeping_numbers(text)
        if strict is None or not _holds(strict, lambda v: isinstance(v, RefusedNumber)):
            raise ValueError(str(exc)) from None
        return strict
    if _holds(parsed, lambda v: isinstance(v, float)):
        strict = _parse_keeping_numbers(text)
        if strict is not None:
            return strict
    return parsed


def _checked_int(text: str) -> int | RefusedNumber:
    value = int(text)
    if METADATA_INT_MIN <= value <= METADATA_INT_MAX:
        return value
    return RefusedNumber(text, "integers must be within the signed 64-bit range")


def _checked_float(text: str) -> float | RefusedNumber:
    value = float(text)
    if math.isfinite(value):
        return value
    return RefusedNumber(text, "numbers must be finite")


def _non_finite(text: str) -> RefusedNumber:
    return RefusedNumber(text, "NaN and Infinity are not allowed")


def _parse_keeping_numbers(text: bytes | str) -> Any:
    """The standard library's reading of `text` with refused numbers kept; None if it fails
    (including nesting too deep for its recursion)."""
    try:
        return json.loads(
            text,
            parse_int=_checked_int,
            parse_float=_checked_float,
            parse_constant=_non_finite,
        )
    except (ValueError, RecursionError):
        return None


def _children(value: Any) -> Iterable[tuple[str | int, Any]] | None:
    if isinstance(value, dict):
        return value.items()
    if isinstance(value, list):
        return enumerate(value)
    return None


def _holds(value: Any, test: Any) -> bool:
    """Whether `test` is true of any value inside `value` (walked without recursion)."""
    stack = [value]
    while stack:
        children = _children(stack.pop())
        if children is None:
            continue
        for _, child in children:
            if test(child):
                return True
            stack.append(child)
    return False


def _refuse(path: tuple[str | int, ...], why: str) -> PydanticCustomError:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    return PydanticCustomError("metadata", f"{why} (at {where})" if where else why)


def check_metadata(metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    """The metadata rules: at most METADATA_MAX_DEPTH levels, integers within signed 64 bits,
    finite numbers, at most METADATA_MAX_BYTES serialized. The depth is checked by a walk
    without recursion before anything serializes the value (orjson fails past 254 levels)."""
    if metadata is None:
        return None
    stack: list[tuple[Any, int, tuple[str | int, ...]]] = [(metadata, 1, ())]
    while stack:
        value, depth, path = stack.pop()
        children = _children(value)
        if children is None:
            if isinstance(value, RefusedNumber):
                raise _refuse(path, f"{value.why}, got {value.text[:40]}")
            if isinstance(value, int) and not isinstance(value, bool):
                if not METADATA_INT_MIN <= value <= METADATA_INT_MAX:
                    raise _refuse(path, "integers must be within the signed 64-bit range")
            elif isinstance(value, float) and not math.isfinite(value):
                raise _refuse(path, "numbers must be finite")
            continue
        if depth > METADATA_MAX_DEPTH:
            raise _refuse(
                path, f"must be at most {METADATA_MAX_DEPTH} levels of objects and arrays"
            )
        stack.extend((child, depth + 1, (*path, key)) for key, child in children)
    try:
        serialized = orjson.dumps(metadata)
    except orjson.JSONEncodeError:  # e.g. a lone surrogate the fallback parser let through
        raise PydanticCustomError("metadata", "must be valid JSON text") from None
    if len(serialized) > METADATA_MAX_BYTES:
        raise PydanticCustomError(
            "too_large", f"must be at most {METADATA_MAX_BYTES // 1024} KiB when serialized"
        )
    return metadata
