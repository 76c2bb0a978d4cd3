"""The wrappers around the whole app (relay/guards.py), over real HTTP on loopback: the
last-resort answer to an unexpected failure."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

from relay import store
from relay.app import create_app
from tests.apiclient import expect_error
from tests.helpers import fast_settings, new_key, serve_in_thread


async def test_an_unexpected_failure_is_a_500_in_the_error_shape_logged_once_in_full(
    db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug behind a route answers 500 `internal_error` as JSON; its traceback is logged
    once, a repeat is one line, and the key is never logged."""

    async def broken(*args: Any) -> None:
        raise RuntimeError("a bug the tests planted")

    # A bug cannot be produced on demand through the real store: plant one.
    monkeypatch.setattr(store, "get_subscription", broken)
    key = await new_key(db_url)
    caplog.set_level(logging.ERROR)
    with serve_in_thread(create_app(fast_settings(db_url), role="api")) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            headers = {"authorization": f"Bearer {key.api_key}"}
            path = f"/v1/subscriptions/sub_{'0' * 26}"
            for _ in range(3):
                response = await client.get(path, headers=headers)
                error = expect_error(response, 500, "internal_error")
                assert "bug" not in error.error.message
            # The app still answers everything else.
            assert (await client.get("/healthz")).status_code == 200
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 1, caplog.text
    assert "a bug the tests planted" in caplog.text
    assert caplog.text.count("unexpected RuntimeError") == 2
    assert key.api_key not in caplog.text
