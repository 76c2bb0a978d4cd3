"""Reaching the relay's API in tests: over real HTTP (uvicorn on a loopback socket, httpx) or
in-process (Starlette's TestClient, lifespan included), through one interface; and checking
answers against the response models of relay.schemas.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import warnings
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel
from starlette.exceptions import StarletteDeprecationWarning

from relay.schemas import ErrorBody, Subscription
from tests.helpers import serve_in_thread

with warnings.catch_warnings():
    # Starlette 1.x asks for httpx2 behind its TestClient; httpx (a relay dependency) still
    # works, and the warning would fail the run under filterwarnings=error.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient as TestClient  # re-exported for the tests

# Literal public addresses: valid callback URLs that need no DNS.
PUBLIC_HOOK = "http://93.184.216.34/hook"
OTHER_PUBLIC_HOOK = "https://93.184.216.35/other"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
M = TypeVar("M", bound=BaseModel)


# --- Reaching the app both ways -----------------------------------------------------------


@dataclass
class Api:
    """One client of the app: real HTTP (`http`) or in-process (`local`), same interface."""

    http: httpx.AsyncClient | None = None
    local: TestClient | None = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        content: bytes | None = None,
        chunks: list[bytes] | None = None,
    ) -> httpx.Response:
        """Send one request; `chunks` sends the body chunked, with no Content-Length."""
        sent_headers = dict(headers or {})
        if key is not None:
            sent_headers["authorization"] = f"Bearer {key}"
        body: Any = content
        if self.http is not None:
            if chunks is not None:
                body = _async_chunks(chunks)
            async with asyncio.timeout(15):
                return await self.http.request(
                    method, path, headers=sent_headers, json=json, content=body
                )
        assert self.local is not None
        if chunks is not None:
            body = iter(chunks)
        async with asyncio.timeout(15):
            return await asyncio.to_thread(
                self.local.request, method, path, headers=sent_headers, json=json, content=body
            )

    async def create(
        self, key: str, generation_id: str, callback_url: str = PUBLIC_HOOK, **extra: Any
    ) -> httpx.Response:
        body = {"generation_id": generation_id, "callback_url": callback_url, **extra}
        return await self.request("POST", "/v1/subscriptions", key=key, json=body)


async def _async_chunks(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


@contextlib.contextmanager
def running(app: Any, transport: str) -> Iterator[str | TestClient]:
    """Run `app`: a base URL for real HTTP, or an entered TestClient (lifespan started)."""
    if transport == "http":
        with serve_in_thread(app) as url:
            yield url
    else:
        with TestClient(app) as client:
            yield client


@contextlib.asynccontextmanager
async def connect(target: str | TestClient) -> AsyncIterator[Api]:
    if isinstance(target, str):
        async with httpx.AsyncClient(base_url=target, timeout=10) as http:
            yield Api(http=http)
    else:
        yield Api(local=target)


TRANSPORTS = ["http", "inprocess"]

# --- Checking answers against the schemas --------------------------------------------------


def expect(response: httpx.Response, status: int, model: type[M]) -> M:
    """The body, checked: the status, and valid against `model` with exactly its fields."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == set(model.model_fields), body
    return model.model_validate(body)


def expect_subscription(response: httpx.Response, status: int) -> Subscription:
    sub = expect(response, status, Subscription)
    assert re.fullmatch(r"sub_[0-9A-Z]{26}", sub.id)
    for stamp in (sub.created_at, sub.updated_at, sub.delivered_at):
        assert stamp is None or TIMESTAMP.match(stamp), stamp
    return sub


def expect_error(response: httpx.Response, status: int, code: str) -> ErrorBody:
    assert response.status_code == status, response.text
    error = ErrorBody.model_validate(response.json())
    assert error.error.code == code, response.text
    assert error.error.message
    return error
