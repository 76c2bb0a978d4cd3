"""The API's shapes and every limit it enforces, each defined once (the metadata rules in
metadata.py, re-exported here).

Requests are validated by these models (the create body, the list query, the path id) and
/openapi.json publishes the same models' JSON schemas, so the document cannot drift from what
the API accepts. Each limit is a constant here that validation, error messages and the
document all read. Response models document what the API sends; tests validate real
responses against them. No HTTP here: the routes turn validation errors into answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    RootModel,
    StringConstraints,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from relay.addresses import MAX_URL_CHARS
from relay.metadata import (
    METADATA_INT_MAX,
    METADATA_INT_MIN,
    METADATA_MAX_BYTES,
    METADATA_MAX_DEPTH,
    RefusedNumber,
    check_metadata,
    parse_json,
)
from relay.models import SubscriptionStatus

__all__ = [
    "METADATA_INT_MAX",
    "METADATA_INT_MIN",
    "METADATA_MAX_BYTES",
    "METADATA_MAX_DEPTH",
    "RefusedNumber",
    "check_metadata",
    "parse_json",
]

# --- Limits ---------------------------------------------------------------------------------

BODY_MAX_BYTES = 64 * 1024
HINT_BODY_MAX_BYTES = 256 * 1024  # an upstream webhook (push hint)
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
_GENERATION_ID = re.compile(GENERATION_ID_PATTERN)


def is_generation_id(value: str) -> bool:
    """Whether `value` follows the generation id rule (for ids from the upstream too)."""
    return len(value) <= GENERATION_ID_MAX_CHARS and _GENERATION_ID.match(value) is not None


# A create through the relay names its model in the path: `provider/model...`, each segment
# by the id rule above (so no segment is "." or ".."), forwarded into the upstream's path.
_SEGMENT = GENERATION_ID_PATTERN.removeprefix("^").removesuffix("$")
MODEL_PATH_PATTERN = rf"^{_SEGMENT}(/{_SEGMENT})*$"
MODEL_PATH_MAX_CHARS = 256
MODEL_PATH_RULE = (
    "must be one or more segments separated by /, each of A-Z a-z 0-9 _ . : -, not only dots"
)
IDEMPOTENCY_KEY_MAX_CHARS = 255
IDEMPOTENCY_KEY_PATTERN = r"^[\x20-\x7e]+$"
IDEMPOTENCY_KEY_RULE = (
    f"must be 1-{IDEMPOTENCY_KEY_MAX_CHARS} printable ASCII characters (a UUID is a good key)"
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
IdempotencyKey = Annotated[
    str,
    StringConstraints(min_length=1, max_length=IDEMPOTENCY_KEY_MAX_CHARS),
    Matches(IDEMPOTENCY_KEY_PATTERN, IDEMPOTENCY_KEY_RULE),
]
# Anything else that accepts metadata (a header, another route) validates it with this type.
Metadata = Annotated[dict[str, Any] | None, AfterValidator(check_metadata)]
# A BeforeValidator wraps what stands left of it: written last, the text check runs first and
# the range stays in the schema as minimum and maximum.
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


class ProxyPath(BaseModel):
    """The path of a create through the relay: the upstream's own, after /v1/generation/."""

    provider: Annotated[
        str,
        StringConstraints(min_length=1, max_length=GENERATION_ID_MAX_CHARS),
        Matches(GENERATION_ID_PATTERN, GENERATION_ID_RULE),
    ] = Field(description="The model's provider, as in the upstream's path.", examples=["flux"])
    model: Annotated[
        str,
        StringConstraints(min_length=1, max_length=MODEL_PATH_MAX_CHARS),
        Matches(MODEL_PATH_PATTERN, MODEL_PATH_RULE),
    ] = Field(
        description="The model, one or more path segments (e.g. `kling-ai/o3/video`).",
        examples=["dev"],
    )


class ProxyHeaders(BaseModel):
    """The headers a create through the relay adds to the upstream's request."""

    model_config = ConfigDict(populate_by_name=True)

    callback_url: str = Field(
        alias="Relay-Callback-Url",
        description=(
            "Where the final result is sent: checked like a subscription's `callback_url` "
            "before anything is forwarded, so a refused URL costs no credits."
        ),
        examples=["https://93.184.216.34/hooks/gen"],
    )
    metadata: str | None = Field(
        default=None,
        alias="Relay-Metadata",
        description="A JSON object, with the rules of a subscription's `metadata`.",
        examples=['{"order": 42}'],
    )
    idempotency_key: IdempotencyKey | None = Field(
        default=None,
        alias="Idempotency-Key",
        description=(
            "A retry with the same key within 24 hours gets the first answer again, "
            "without a second create upstream."
        ),
        examples=["9f1c2d3e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"],
    )


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
    "unsupported_media_type",
    "validation_error",
    "rate_limited",
    "quota_exceeded",
    "request_timeout",
    "unavailable",
    "upstream_unavailable",
    "upstream_timeout",
    "upstream_invalid_answer",
    "idempotency_mismatch",
    "idempotency_in_progress",
    "idempotency_outcome_unknown",
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
    upstream: Literal["ok", "unauthorized", "unreachable", "unknown"] = Field(
        description="How the last upstream requests went."
    )
    hints: Literal["ok", "silent", "off"] = Field(
        description="Push hints: one arrived within RELAY_HINT_SILENCE (ok), none did "
        "(silent), or RELAY_UPSTREAM_WEBHOOK_SECRET is unset (off)."
    )


class UpstreamWebhook(RootModel[dict[str, Any]]):
    """One of the upstream's workspace webhooks (task.created, task.started,
    task.completed, task.failed, task.canceled), signed per Standard Webhooks with one of
    RELAY_UPSTREAM_WEBHOOK_SECRET's secrets. The generation id is the first string at
    prediction.id, data.prediction.id, data.id, id, task_id or data.task_id; its state is
    prediction.state, else prediction.status, else the event name in type."""
