"""The API's shapes: request validation and the OpenAPI document come from these models.

The create body is validated by `SubscriptionCreate` itself (strict types, unknown fields
refused), and the same model's JSON schema is what /openapi.json publishes, so the document
cannot drift from what the API accepts. Response models document what the API sends; tests
validate real responses against them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

GENERATION_ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"
METADATA_MAX_BYTES = 4096
BODY_MAX_BYTES = 64 * 1024

GenerationId = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=GENERATION_ID_PATTERN)
]
SubscriptionStatus = Literal["active", "delivered", "failed", "canceled", "expired"]


class SubscriptionCreate(BaseModel):
    """Ask for a callback when a generation reaches a final status."""

    model_config = ConfigDict(extra="forbid", strict=True)

    generation_id: GenerationId = Field(
        description="The upstream generation id: 1-128 characters from A-Z a-z 0-9 _ . : -",
        examples=["gen_123"],
    )
    callback_url: Annotated[str, StringConstraints(min_length=1, max_length=2048)] = Field(
        description=(
            "Absolute http(s) URL, at most 2048 characters, no user:password part. Unless the "
            "operator allows private callbacks, it must not be, or resolve to, a loopback, "
            "private, link-local, unique-local, multicast, unspecified or reserved address."
        ),
        examples=["https://app.example.com/hooks/gen"],
    )
    metadata: dict[str, Any] | None = Field(
        default=None,
        description="Any JSON object, at most 4 KiB serialized; stored and shown back.",
        examples=[{"order": 42}],
    )


class Subscription(BaseModel):
    id: str = Field(examples=["sub_01JDQ8Z8X7C1M5G1Q2W3E4R5T6"])
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
    next_cursor: str | None


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


class ErrorInfo(BaseModel):
    code: Literal[
        "invalid_json",
        "unauthorized",
        "not_found",
        "method_not_allowed",
        "conflict",
        "payload_too_large",
        "validation_error",
        "rate_limited",
        "unavailable",
    ]
    message: str
    details: list[ErrorDetail] | None = None


class ErrorBody(BaseModel):
    error: ErrorInfo


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    database: Literal["ok", "unavailable"]
    upstream: Literal["ok", "unauthorized", "unreachable", "unknown"]
