"""The OpenAPI 3.1 document, built from the same pydantic models that validate requests."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from relay import __version__
from relay.schemas import (
    AttemptList,
    ErrorBody,
    Health,
    Readiness,
    Subscription,
    SubscriptionCreate,
    SubscriptionList,
)

_REF = "#/components/schemas/{model}"
_ERRORS = {
    "400": "invalid_json: the body is not JSON, or not an object",
    "401": "unauthorized: no key, unknown key, revoked key",
    "404": "not_found: no such subscription for this key",
    "409": "conflict: nothing to redeliver",
    "413": "payload_too_large: body over 64 KiB",
    "422": "validation_error: `details` lists each field and why",
    "429": "rate_limited: the key sends too fast (see Retry-After)",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: _json(ErrorBody, _ERRORS[code]) for code in codes}


_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^sub_[0-9A-Z]{26}$"},
}


def build_openapi() -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        SubscriptionCreate,
        Subscription,
        SubscriptionList,
        AttemptList,
        ErrorBody,
        Health,
        Readiness,
    ]
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    auth: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "relay",
            "version": __version__,
            "description": "Subscribe to an upstream generation; get a signed callback when it "
            "reaches COMPLETED, FAILED or CANCELED.",
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/subscriptions": {
                "post": {
                    "summary": "Create a subscription (idempotent per key, generation and URL)",
                    "security": auth,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref(SubscriptionCreate)}},
                    },
                    "responses": {
                        "201": _json(Subscription, "created"),
                        "200": _json(Subscription, "an identical active subscription exists"),
                        **_errors("400", "401", "413", "422", "429"),
                    },
                },
                "get": {
                    "summary": "List this key's subscriptions, newest first",
                    "security": auth,
                    "parameters": [
                        {
                            "name": "status",
                            "in": "query",
                            "schema": Subscription.model_json_schema()["properties"]["status"],
                        },
                        {
                            "name": "generation_id",
                            "in": "query",
                            "schema": SubscriptionCreate.model_json_schema()["properties"][
                                "generation_id"
                            ],
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": 500,
                                "default": 50,
                            },
                        },
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": _json(SubscriptionList, "a page of subscriptions"),
                        **_errors("401", "422", "429"),
                    },
                },
            },
            "/v1/subscriptions/{id}": {
                "parameters": [_ID],
                "get": {
                    "summary": "Get a subscription",
                    "security": auth,
                    "responses": {
                        "200": _json(Subscription, "the subscription"),
                        **_errors("401", "404", "429"),
                    },
                },
                "delete": {
                    "summary": "Cancel a subscription (a final one stays as it was)",
                    "security": auth,
                    "responses": {
                        "200": _json(Subscription, "the subscription, now canceled"),
                        **_errors("401", "404", "429"),
                    },
                },
            },
            "/v1/subscriptions/{id}/attempts": {
                "parameters": [_ID],
                "get": {
                    "summary": "Delivery attempts, oldest first",
                    "security": auth,
                    "responses": {
                        "200": _json(AttemptList, "the attempts"),
                        **_errors("401", "404", "429"),
                    },
                },
            },
            "/v1/subscriptions/{id}/redeliver": {
                "parameters": [_ID],
                "post": {
                    "summary": "Send the stored final result again (same webhook-id)",
                    "security": auth,
                    "responses": {
                        "202": _json(Subscription, "queued"),
                        **_errors("401", "404", "409", "429"),
                    },
                },
            },
            "/healthz": {
                "get": {"summary": "Liveness", "responses": {"200": _json(Health, "running")}}
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: the database answers; how the last polls went",
                    "responses": {
                        "200": _json(Readiness, "ready"),
                        "503": _json(Readiness, "the database does not answer"),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": {"description": "OpenAPI 3.1 document"}},
                }
            },
        },
    }
