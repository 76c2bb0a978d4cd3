"""The API's shapes and every limit it enforces, each defined once.

Requests are validated by these models (the create body, the list query, the path id) and
/openapi.json publishes the same models' JSON schemas, so the document cannot drift from what
the API accepts. Each limit is a constant here that validation, error messages and the
document all read. Response models document what the API sends; tests validate real
responses against them. No HTTP here: the routes turn validation errors into answers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    StringConstraints,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from relay.addresses import MAX_URL_CHARS
from relay.models import SubscriptionStatus

# --- Limits ---------------------------------------------------------------------------------

BODY_MAX_BYTES = 64 * 1024
METADATA_MAX_BYTES = 4 * 1024
METADATA_MAX_DEPTH = 32  # levels of objects and arrays; the metadata object is level 1
# JSON numbers are arbitrary; metadata integers must fit a signed 64-bit integer, the widest
# most clients' JSON libraries read back without changing them.
METADATA_INT_MIN = -(2**63)
METADATA_INT_MAX = 2**63 - 1
# The URL rule's own module (pure, also used at delivery time) holds the character limit.
CALLBACK_URL_MAX_CHARS = MAX_URL_CHARS
# Indexed for idempotency, and an index row has a size limit: the bytes are bounded too.
CALLBACK_URL_MAX_BYTES = 2048
GENERATION_ID_MAX_CHARS = 128
LIST_LIMIT_MIN = 1
LIST_LIMIT_MAX = 500
LIST_LIMIT_DEFAULT = 50

# One id rule for the create body and the list query: characters safe in an upstream URL
# path, and at least one that is not a dot, so "." and ".." cannot change the path polled.
# No lookahead, so every regex dialect (JSON Schema's, test generators') reads it alike;
# the length is the schema's minLength and maxLength.
GENERATION_ID_PATTERN = r"^[A-Za-z0-9_.:\-]*[A-Za-z0-9_:\-][A-Za-z0-9_.:\-]*$"
GENERATION_ID_RULE = (
    f"must be 1-{GENERATION_ID_MAX_CHARS} characters of A-Z a-z 0-9 _ . : -, not only dots"
)
# The shape of a callback URL, as far as a pattern can tell (the document publishes it); the
# URL rule itself is addresses.parse_callback_url, and whether the host may be called needs DNS.
CALLBACK_URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://[^\s/?#@]+([/?#]\S*)?$"
CALLBACK_URL_RULE = "must be an absolute http or https URL, without spaces or a user:password part"
# `sub_` + 26 Crockford base32 characters (ids.py): what every subscription id looks like.
SUBSCRIPTION_ID_PATTERN = r"^sub_[0-9A-HJKMNP-TV-Z]{26}$"
SUBSCRIPTION_ID_RULE = "must be a subscription id (sub_ and 26 characters of Crockford base32)"


@dataclass(frozen=True)
class Matches:
    """A string constraint whose failure says `rule`, published as the schema's `pattern`.

    pydantic's own pattern error quotes the regex; a client is better served by the rule in
    words. The regex is matched whole (`fullmatch`), as JSON Schema's anchored patterns are.
    """

    pattern: str
    rule: str

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        regex = re.compile(self.pattern)
        rule = self.rule

        def check(value: str) -> str:
            if regex.fullmatch(value) is None:
                raise PydanticCustomError("pattern_mismatch", rule)
            return value

        return core_schema.no_info_after_validator_function(check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema["pattern"] = self.pattern
        return json_schema


def _utf8_within_limit(url: str) -> str:
    if len(url.encode()) > CALLBACK_URL_MAX_BYTES:
        raise PydanticCustomError(
            "too_many_bytes", f"must be at most {CALLBACK_URL_MAX_BYTES} bytes as UTF-8"
        )
    return url


# --- JSON text and the metadata rules ------------------------------------------------------


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


def _list_limit(value: Any) -> Any:
    """Query values are text: only plain ASCII digits are a number (not " 5", "5.0", "²")."""
    if isinstance(value, str):
        if re.fullmatch(r"[0-9]{1,6}", value) is None or not (
            LIST_LIMIT_MIN <= int(value) <= LIST_LIMIT_MAX
        ):
            raise PydanticCustomError(
                "list_limit", f"must be a whole number from {LIST_LIMIT_MIN} to {LIST_LIMIT_MAX}"
            )
        return int(value)
    return value


GenerationId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=GENERATION_ID_MAX_CHARS),
    Matches(GENERATION_ID_PATTERN, GENERATION_ID_RULE),
]
SubscriptionId = Annotated[str, Matches(SUBSCRIPTION_ID_PATTERN, SUBSCRIPTION_ID_RULE)]
CallbackUrl = Annotated[
    str,
    StringConstraints(min_length=1, max_length=CALLBACK_URL_MAX_CHARS),
    Matches(CALLBACK_URL_PATTERN, CALLBACK_URL_RULE),
    AfterValidator(_utf8_within_limit),
]
# A BeforeValidator wraps what stands left of it: written last, the text check runs first and
# the range stays in the schema as minimum and maximum.
# Anything else that accepts metadata (a header, another route) validates it with this type.
Metadata = Annotated[dict[str, Any] | None, AfterValidator(check_metadata)]
ListLimit = Annotated[
    int, Field(ge=LIST_LIMIT_MIN, le=LIST_LIMIT_MAX), BeforeValidator(_list_limit)
]


# --- Requests -------------------------------------------------------------------------------


class SubscriptionCreate(BaseModel):
    """Ask for a callback when a generation reaches a final status."""

    model_config = ConfigDict(extra="forbid", strict=True)

    generation_id: GenerationId = Field(
        description=f"The upstream generation id: {GENERATION_ID_RULE}.",
        examples=["gen_123"],
    )
    callback_url: CallbackUrl = Field(
        description=(
            f"Absolute http(s) URL, at most {CALLBACK_URL_MAX_CHARS} characters (and "
            f"{CALLBACK_URL_MAX_BYTES} bytes as UTF-8), no user:password part. Unless the "
            "operator allows private callbacks, it must not be, or resolve to, a loopback, "
            "private, link-local, unique-local, multicast, unspecified or reserved address."
        ),
        # A literal public address: the example works where no DNS answers.
        examples=["https://93.184.216.34/hooks/gen"],
    )
    metadata: Metadata = Field(
        default=None,
        description=(
            f"Any JSON object, at most {METADATA_MAX_BYTES // 1024} KiB serialized and "
            f"{METADATA_MAX_DEPTH} levels of objects and arrays deep (the object itself is "
            "level 1); integers within the signed 64-bit range, no NaN or Infinity. Stored "
            "and shown back exactly as sent."
        ),
        examples=[{"order": 42}],
    )


class SubscriptionListQuery(BaseModel):
    """The list's query parameters. An empty value is a value (refused where the schema says
    so), not an absent parameter; parameters this API does not know are ignored."""

    status: SubscriptionStatus | None = Field(
        default=None, description="Only subscriptions with this status."
    )
    generation_id: GenerationId | None = Field(
        default=None, description="Only subscriptions of this generation."
    )
    limit: ListLimit = Field(
        default=LIST_LIMIT_DEFAULT, description="The most subscriptions on one page."
    )
    cursor: SubscriptionId | None = Field(
        default=None,
        description=(
            "The `next_cursor` of the previous page: the id of that page's last "
            "subscription; the page goes on with older subscriptions."
        ),
    )


class SubscriptionPath(BaseModel):
    """The path of one subscription; an id not of this form is 404 (no such subscription)."""

    id: SubscriptionId


# --- Responses ------------------------------------------------------------------------------


class Subscription(BaseModel):
    id: SubscriptionId = Field(examples=["sub_01JDQ8Z8X7C1M5G1Q2W3E4R5T6"])
    generation_id: str
    callback_url: str
    metadata: dict[str, Any] | None
    status: SubscriptionStatus
    generation_status: str | None = Field(description="The last status seen upstream, or null.")
    attempts: int
    last_error: str | None
    created_at: str = Field(examples=["2026-11-28T12:00:00Z"])
    updated_at: str
    delivered_at: str | None


class SubscriptionList(BaseModel):
    items: list[Subscription]
    next_cursor: SubscriptionId | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )


class Attempt(BaseModel):
    attempt: int
    webhook_id: str
    started_at: str
    duration_ms: int
    status_code: int | None
    error: str | None
    response_excerpt: str | None


class AttemptList(BaseModel):
    items: list[Attempt]


class ErrorDetail(BaseModel):
    field: str
    message: str


ErrorCode = Literal[
    "invalid_json",
    "unauthorized",
    "not_found",
    "method_not_allowed",
    "conflict",
    "payload_too_large",
    "validation_error",
    "rate_limited",
    "quota_exceeded",
    "request_timeout",
    "unavailable",
    "internal_error",
]


class ErrorInfo(BaseModel):
    code: ErrorCode
    message: str
    details: list[ErrorDetail] | None = None


class ErrorBody(BaseModel):
    error: ErrorInfo


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    database: Literal["ok", "unavailable"]
    upstream: Literal["ok", "unauthorized", "unreachable", "unknown"]
