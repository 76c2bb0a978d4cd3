"""The OpenAPI 3.1 document, built by walking the route table: each route's `Operation`
(http.py) says what it is, and its models (schemas.py) give the schemas, so the document
cannot name a route that is not served, or miss one that is. No hand-written paths here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from relay import __version__
from relay.http import Answer, Operation, endpoint, operations, route
from relay.schemas import BODY_MAX_BYTES, ErrorBody

_REF = "#/components/schemas/{model}"
# The error codes behind each error status; the contract's table, in the document's words.
_ERRORS = {
    400: "invalid_json: the body is not JSON, or not an object",
    401: "unauthorized: no key, unknown key, revoked key",
    404: "not_found: no such subscription (or generation) for this key",
    408: "request_timeout: the body did not arrive within RELAY_BODY_TIMEOUT",
    409: "conflict: nothing to redeliver",
    413: f"payload_too_large: body over {BODY_MAX_BYTES // 1024} KiB",
    415: "unsupported_media_type: the body is not application/json or multipart/form-data",
    422: "validation_error: `details` lists each field and why",
    429: "rate_limited: the key (or an address with unknown keys) sends too fast (see "
    "Retry-After); quota_exceeded: the key has RELAY_MAX_ACTIVE_PER_KEY active subscriptions",
    502: "upstream_unavailable or upstream_invalid_answer: no usable answer from the upstream",
    504: "upstream_timeout: the upstream did not answer in time",
}
# Starlette's path converters ({model:path}) are not OpenAPI's.
_CONVERTER = re.compile(r"\{(\w+):\w+\}")

OPENAPI = Operation(
    "getOpenapi",
    "This document",
    {200: Answer("OpenAPI 3.1 document")},
    authenticated=False,
)


def with_openapi(routes: Sequence[BaseRoute]) -> list[BaseRoute]:
    """`routes` and GET /openapi.json: the document of them all, itself included."""
    document = b""

    async def openapi(request: Request) -> Response:
        return Response(document, media_type="application/json")

    served = [*routes, route("/openapi.json", GET=endpoint(OPENAPI, openapi))]
    document = orjson.dumps(build_openapi(served))
    return served


def build_openapi(routes: Sequence[BaseRoute]) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    paths: dict[str, dict[str, Any]] = {}
    for served in routes:
        if isinstance(served, Route):
            for method, operation in operations(served).items():
                item = paths.setdefault(_CONVERTER.sub(r"{\1}", served.path), {})
                item[method.lower()] = _operation(operation, schemas)
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
            "securitySchemes": SECURITY_SCHEMES,
        },
        "paths": paths,
    }


SECURITY_SCHEMES: dict[str, Any] = {
    "bearer": {"type": "http", "scheme": "bearer"},
    "webhookSignature": {
        "type": "apiKey",
        "in": "header",
        "name": "webhook-signature",
        "description": "Standard Webhooks: webhook-id, webhook-timestamp and "
        "webhook-signature, signed with one of RELAY_UPSTREAM_WEBHOOK_SECRET's secrets.",
    },
}


def _operation(operation: Operation, schemas: dict[str, Any]) -> dict[str, Any]:
    described: dict[str, Any] = {
        "operationId": operation.operation_id,
        "summary": operation.summary,
    }
    if operation.authenticated:
        described["security"] = [{operation.security: []}]
    parameters = []
    if operation.path is not None:
        parameters += _parameters(operation.path, "path", schemas)
    if operation.query is not None:
        parameters += _parameters(operation.query, "query", schemas)
    if operation.headers is not None:
        parameters += _parameters(operation.headers, "header", schemas)
    if parameters:
        described["parameters"] = parameters
    if operation.body is not None:
        described["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _component(operation.body, schemas)}},
        }
    elif operation.raw_body:
        described["requestBody"] = {
            "required": True,
            "content": {media: {"schema": {}} for media in operation.raw_body},
        }
    responses = {
        str(status): _answer(answer, schemas) for status, answer in operation.answers.items()
    }
    for status in operation.errors:
        note = operation.error_notes.get(status, _ERRORS[status])
        responses[str(status)] = _answer(Answer(note, ErrorBody), schemas)
    if operation.passthrough is not None:
        responses["default"] = _answer(operation.passthrough, schemas)
    described["responses"] = responses
    return described


def _answer(answer: Answer, schemas: dict[str, Any]) -> dict[str, Any]:
    schema = {"type": "object"} if answer.model is None else _component(answer.model, schemas)
    described: dict[str, Any] = {
        "description": answer.description,
        "content": {"application/json": {"schema": schema}},
    }
    if answer.headers:
        described["headers"] = {
            name: {"description": description, "schema": {"type": "string"}}
            for name, description in answer.headers.items()
        }
    if answer.links:
        # What a client (or a stateful fuzzer) can call next with this answer's id.
        described["links"] = {
            operation_id: {
                "operationId": operation_id,
                "parameters": {"id": "$response.body#/id"},
            }
            for operation_id in answer.links
        }
    return described


def _schema(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, Any]:
    """`model`'s JSON schema; the schemas it refers to go into `schemas`."""
    schema = model.model_json_schema(ref_template=_REF)
    schemas.update(schema.pop("$defs", {}))
    return schema


def _component(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, str]:
    schemas[model.__name__] = _schema(model, schemas)
    return {"$ref": _REF.format(model=model.__name__)}


def _parameters(
    model: type[BaseModel], location: str, schemas: dict[str, Any]
) -> list[dict[str, Any]]:
    """One parameter per field of `model`, in `location` (path or query)."""
    schema = _schema(model, schemas)
    required = set(schema.get("required", ()))
    parameters = []
    for name, field_schema in schema["properties"].items():
        value_schema = _present(field_schema)
        value_schema.pop("title", None)
        parameter: dict[str, Any] = {
            "name": name,
            "in": location,
            "required": name in required,
        }
        description = value_schema.pop("description", None)
        if description is not None:
            parameter["description"] = description
        parameter["schema"] = value_schema
        parameters.append(parameter)
    return parameters


def _present(field_schema: Mapping[str, Any]) -> dict[str, Any]:
    """The schema of a parameter's value when it is sent. An optional field (`X | None`) is
    an optional parameter: absent when not sent, never null, so the null branch goes."""
    variants = field_schema.get("anyOf")
    if variants is None:
        return dict(field_schema)
    rest = {k: v for k, v in field_schema.items() if k != "anyOf" and (k, v) != ("default", None)}
    kept = [variant for variant in variants if variant != {"type": "null"}]
    return {**kept[0], **rest} if len(kept) == 1 else {"anyOf": kept, **rest}
