"""/openapi.json against the routes served and against the API's behaviour, over real HTTP.

The document is built from the route table, so these tests check the two ways it could still
mislead a client: a route served but not documented (or the reverse), and a schema that
accepts what the API refuses (or the reverse). For the second, each documented query
parameter gets sample values, and the document's verdict on each (as a client or fuzzer
reads the schema) must be the API's answer.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from relay import migrate
from relay.app import Role, create_app
from relay.schemas import SubscriptionCreate, SubscriptionList
from tests.apiclient import Api, connect, expect, expect_error, expect_subscription, running
from tests.helpers import fast_settings, new_key

BY_ID = {"getSubscription", "cancelSubscription", "listAttempts", "redeliverSubscription"}


@dataclass
class Served:
    db_url: str
    app: Starlette
    url: str
    api_key: str
    doc: dict[str, Any]


def _serve(db_url: str, role: Role) -> Iterator[Served]:
    app = create_app(fast_settings(db_url, allow_private_callbacks=False), role=role)
    api_key = asyncio.run(new_key(db_url)).api_key
    with running(app, "http") as url:
        assert isinstance(url, str)
        doc = asyncio.run(_document(url))
        yield Served(db_url, app, url, api_key, doc)


async def _document(url: str) -> dict[str, Any]:
    async with connect(url) as client:
        response = await client.request("GET", "/openapi.json")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    doc: dict[str, Any] = response.json()
    return doc


@pytest.fixture(scope="module")
def module_db_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('openapi')}/relay.db"
    migrate.upgrade(url)
    return url


@pytest.fixture(scope="module")
def served(module_db_url: str) -> Iterator[Served]:
    yield from _serve(module_db_url, "api")


@pytest.fixture
async def api(served: Served) -> AsyncIterator[Api]:
    async with connect(served.url) as client:
        yield client


def _operations(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every documented operation by its operationId."""
    found = {}
    for item in doc["paths"].values():
        for operation in item.values():
            assert operation["operationId"] not in found, operation["operationId"]
            found[operation["operationId"]] = operation
    return found


def _query_schema(doc: dict[str, Any], operation_id: str, name: str) -> dict[str, Any]:
    for parameter in _operations(doc)[operation_id]["parameters"]:
        if parameter["name"] == name:
            assert parameter["in"] == "query"
            schema: dict[str, Any] = parameter["schema"]
            return schema
    raise AssertionError(f"{operation_id} documents no query parameter {name}")


def schema_accepts(doc: dict[str, Any], schema: dict[str, Any], value: str) -> bool:
    """Whether a query value (text) is valid against a parameter's schema in `doc`."""
    if "$ref" in schema:
        referred = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        schema = {**referred, **{k: v for k, v in schema.items() if k != "$ref"}}
    if "enum" in schema:
        return value in schema["enum"]
    if schema["type"] == "integer":
        if re.fullmatch(r"-?[0-9]+", value) is None:
            return False
        number = int(value)
        return bool(schema.get("minimum", number) <= number <= schema.get("maximum", number))
    assert schema["type"] == "string"
    if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
        return False
    pattern = schema.get("pattern")
    # The document's patterns are anchored (^...$), so a whole match is JSON Schema's match.
    assert pattern is None or (pattern.startswith("^") and pattern.endswith("$"))
    return pattern is None or re.fullmatch(pattern, value) is not None


# --- Routes and operations ------------------------------------------------------------------


@pytest.mark.parametrize("role", ["api", "worker"])
def test_the_document_lists_exactly_the_routes_served(role: Role, module_db_url: str) -> None:
    """Every method of every route is documented, and every documented one is served."""
    for served in _serve(module_db_url, role):
        served_methods = {
            # Starlette's converters ({model:path}) are written without the type in OpenAPI.
            (re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path), method)
            for route in served.app.routes
            if isinstance(route, Route)
            for method in (route.methods or set()) - {"HEAD"}
        }
        documented = {
            (path, method.upper()) for path, item in served.doc["paths"].items() for method in item
        }
        assert served_methods == documented
        assert ("/openapi.json", "GET") in documented
        assert (("/v1/subscriptions", "POST") in documented) == (role != "worker")
        proxied = ("/v1/generation/{provider}/{model}", "POST")
        assert (proxied in documented) == (role != "worker")


def test_the_document_is_openapi_3_1_built_from_the_models(served: Served) -> None:
    """The create schema is the validating model's; refs resolve; errors are ErrorBody."""
    doc = served.doc
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]
    assert schemas["SubscriptionCreate"] == {
        k: v for k, v in SubscriptionCreate.model_json_schema().items() if k != "$defs"
    }
    refs = re.findall(r'"\$ref":\s*"#/components/schemas/([^"]+)"', json.dumps(doc))
    assert refs
    assert set(refs) <= set(schemas)
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            for status, answer in operation["responses"].items():
                if status.startswith("4"):
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, status)
            if path.startswith("/v1/"):
                assert "401" in operation["responses"], (method, path)
                expected = "webhookSignature" if path == "/v1/upstream/webhook" else "bearer"
                assert operation["security"] == [{expected: []}], (method, path)


async def test_create_links_to_every_operation_on_the_id_and_the_links_work(
    served: Served, api: Api
) -> None:
    """201 and 200 of create link to get, cancel, attempts and redeliver by `id`; following
    each link with a created subscription's id answers one of that operation's statuses."""
    operations = _operations(served.doc)
    create = operations["createSubscription"]
    for status in ("201", "200"):
        links = create["responses"][status]["links"]
        assert {link["operationId"] for link in links.values()} == BY_ID
        for link in links.values():
            assert link["parameters"] == {"id": "$response.body#/id"}
    paths = {
        operation["operationId"]: (path, method.upper())
        for path, item in served.doc["paths"].items()
        for method, operation in item.items()
    }
    created = expect_subscription(await api.create(served.api_key, "gen_links"), 201)
    for operation_id in sorted(BY_ID):
        path, method = paths[operation_id]
        assert [p["name"] for p in operations[operation_id]["parameters"]] == ["id"]
        response = await api.request(method, path.replace("{id}", created.id), key=served.api_key)
        assert str(response.status_code) in operations[operation_id]["responses"], response.text
        assert response.status_code != 404, (operation_id, response.text)


async def test_the_create_example_is_accepted_where_no_dns_answers(
    served: Served, api: Api
) -> None:
    """The document's example body names a literal public address, and the API takes it."""
    properties = served.doc["components"]["schemas"]["SubscriptionCreate"]["properties"]
    example = {name: schema["examples"][0] for name, schema in properties.items()}
    host = urlsplit(example["callback_url"]).hostname
    assert host is not None
    assert ipaddress.ip_address(host).is_global
    response = await api.request("POST", "/v1/subscriptions", key=served.api_key, json=example)
    expect_subscription(response, 201)


# --- The schemas say what the API accepts ----------------------------------------------------

ID_SAMPLES = [
    "gen_1",
    "a.b",
    ".a",
    "a.",
    "x:y-z",
    "g" * 128,
    ".",
    "..",
    "...",
    "",
    "g" * 129,
    "a/b",
    "a b",
    "gén",
]


async def test_the_id_rule_is_the_documents_for_the_body_and_the_query(
    served: Served, api: Api
) -> None:
    """A generation id is accepted by create and by the list filter exactly when the
    document's schema accepts it: dots alone ("." and "..") and empty values are refused."""
    body_schema = served.doc["components"]["schemas"]["SubscriptionCreate"]["properties"][
        "generation_id"
    ]
    query_schema = _query_schema(served.doc, "listSubscriptions", "generation_id")
    for value in ID_SAMPLES:
        valid = schema_accepts(served.doc, body_schema, value)
        assert schema_accepts(served.doc, query_schema, value) == valid, value
        created = await api.create(served.api_key, value)
        listed = await api.request(
            "GET", f"/v1/subscriptions?generation_id={quote(value)}", key=served.api_key
        )
        if valid:
            expect_subscription(created, 201)
            expect(listed, 200, SubscriptionList)
        else:
            for response in (created, listed):
                error = expect_error(response, 422, "validation_error")
                assert error.error.details
                assert "generation_id" in {d.field for d in error.error.details}, value
    assert not schema_accepts(served.doc, body_schema, ".")
    assert not schema_accepts(served.doc, body_schema, "..")


def _old_style_cursor(sub_id: str) -> str:
    return base64.urlsafe_b64encode(sub_id.encode()).decode().rstrip("=")


async def test_query_values_are_refused_exactly_when_the_schema_refuses_them(
    served: Served, api: Api
) -> None:
    """For every list parameter, empty values included, the API's 200 or 422 is the
    document's verdict; a cursor the schema accepts is a position, never refused."""
    key = (await new_key(served.db_url)).api_key
    ids = [expect_subscription(await api.create(key, f"gen_q{n}"), 201).id for n in range(3)]
    first_page = expect(
        await api.request("GET", "/v1/subscriptions?limit=1", key=key), 200, SubscriptionList
    )
    assert first_page.next_cursor is not None
    cursor_schema = _query_schema(served.doc, "listSubscriptions", "cursor")
    assert schema_accepts(served.doc, cursor_schema, first_page.next_cursor)
    samples = {
        "status": ["active", "canceled", "", "bogus", "ACTIVE"],
        "limit": ["1", "50", "500", "", "0", "501", "-1", "abc", "1.5"],
        "cursor": [
            first_page.next_cursor,
            "sub_" + "0" * 26,
            "sub_" + "Z" * 26,
            "",
            "garbage",
            _old_style_cursor(ids[0]),
            "sub_" + "I" * 26,
            ids[0].lower(),
        ],
        "generation_id": ["gen_q1", "", ".", "..", "a b"],
    }
    documented = {p["name"] for p in _operations(served.doc)["listSubscriptions"]["parameters"]}
    assert set(samples) == documented
    for name, values in samples.items():
        schema = _query_schema(served.doc, "listSubscriptions", name)
        for value in values:
            response = await api.request("GET", f"/v1/subscriptions?{name}={quote(value)}", key=key)
            if schema_accepts(served.doc, schema, value):
                expect(response, 200, SubscriptionList)
            else:
                error = expect_error(response, 422, "validation_error")
                assert error.error.details
                assert name in {d.field for d in error.error.details}, (name, value)

    async def listed(cursor: str) -> list[str]:
        page = expect(
            await api.request("GET", f"/v1/subscriptions?cursor={cursor}", key=key),
            200,
            SubscriptionList,
        )
        return [s.id for s in page.items]

    # A cursor is a position in id order: the page holds the subscriptions older than it.
    assert await listed("sub_" + "Z" * 26) == sorted(ids, reverse=True)
    assert await listed("sub_" + "0" * 26) == []
    assert await listed(ids[1]) == [ids[0]]


# --- Creating generations through the relay ---------------------------------------------------


def test_the_create_through_the_relay_is_documented(served: Served) -> None:
    """createGeneration documents its path, its Relay-* and Idempotency-Key headers, JSON and
    multipart bodies, Relay-Subscription-Id on success and the upstream's refusals as its
    default answer."""
    item = served.doc["paths"]["/v1/generation/{provider}/{model}"]
    operation = item["post"]
    assert operation["operationId"] == "createGeneration"
    parameters = {(p["in"], p["name"]): p for p in operation["parameters"]}
    assert set(parameters) == {
        ("path", "provider"),
        ("path", "model"),
        ("header", "Relay-Callback-Url"),
        ("header", "Relay-Metadata"),
        ("header", "Idempotency-Key"),
    }
    assert parameters[("header", "Relay-Callback-Url")]["required"]
    assert not parameters[("header", "Idempotency-Key")]["required"]
    assert parameters[("header", "Idempotency-Key")]["schema"]["maxLength"] == 255
    assert set(operation["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert "Relay-Subscription-Id" in operation["responses"]["200"]["headers"]
    assert {"401", "409", "413", "422", "502", "504", "default"} <= set(operation["responses"])
    assert "idempotency_outcome_unknown" in operation["responses"]["409"]["description"]


MODEL_SAMPLES = ["dev", "o3/video", "v2.1:fast", "..", "a/..", "a//b", "a/", "a b", "m" * 257]


async def test_the_model_path_rule_is_the_documents(served: Served, api: Api) -> None:
    """A model path is routed to the upstream exactly when the document's pattern accepts it
    (here the upstream is unreachable: 502); any other is 404 and nothing is forwarded."""
    operation = served.doc["paths"]["/v1/generation/{provider}/{model}"]["post"]
    (schema,) = [p["schema"] for p in operation["parameters"] if p["name"] == "model"]
    for value in MODEL_SAMPLES:
        response = await api.request(
            "POST",
            # Dots escaped: the client would resolve "a/.." itself otherwise.
            f"/v1/generation/flux/{quote(value, safe='/').replace('.', '%2E')}",
            key=served.api_key,
            headers={
                "relay-callback-url": "http://93.184.216.34/hook",
                "content-type": "application/json",
            },
            content=b"{}",
        )
        if schema_accepts(served.doc, schema, value):
            expect_error(response, 502, "upstream_unavailable")
        else:
            expect_error(response, 404, "not_found")
