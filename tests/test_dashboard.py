"""/dashboard: the admin token (bearer, or once as ?token= then a cookie), escaping of every
value from the database, no query string or secret shown; and the page in a real headless
browser (Debian's chromium driven by Selenium) after a few callbacks and failures, with a
screenshot written to docs/: docs/dashboard-latest.png (ignored by git, so a run leaves the
checkout clean), or with RELAY_UPDATE_SCREENSHOT=1 docs/dashboard.png, the README's picture.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from relay.app import create_app
from relay.simulator import FakeUpstream
from tests.delivery import (
    final_generation,
    pending_generation,
    running_relay,
    subscribe,
    wait_status,
)
from tests.helpers import (
    ADMIN_TOKEN,
    ROOT,
    Receiver,
    admin_headers,
    fast_settings,
    new_key,
    serve_in_thread,
    serve_receiver,
    wait_for,
)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Without the networking flags Chromium's own connections are refused on a closed network.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1150",
)
SCREENSHOT = ROOT / "docs" / "dashboard.png"
LATEST_SCREENSHOT = ROOT / "docs" / "dashboard-latest.png"


# --- The admin token -----------------------------------------------------------------------------


async def test_the_dashboard_needs_the_admin_token(db_url: str) -> None:
    """404 without RELAY_ADMIN_TOKEN; 401 without the token; the token once as ?token= is a
    303 to the page without it, with an HttpOnly, SameSite=Strict cookie that is not the
    token; the cookie or the bearer token then open the page."""
    async with httpx.AsyncClient(timeout=10, follow_redirects=False) as client:
        with serve_in_thread(create_app(fast_settings(db_url), role="api")) as base:
            assert (await client.get(f"{base}/dashboard?token={ADMIN_TOKEN}")).status_code == 404
        settings = fast_settings(db_url, admin_token=ADMIN_TOKEN)
        with serve_in_thread(create_app(settings, role="api")) as base:
            page = f"{base}/dashboard"
            for refused in (
                client.get(page),
                client.get(f"{page}?token=not-the-token-at-all"),
                client.get(page, headers={"cookie": f"relay_admin={ADMIN_TOKEN}"}),
                client.get(page, headers={"cookie": "relay_admin=0123abcd"}),
                client.get(page, headers=admin_headers("wrong-token-wrong-token")),
            ):
                response = await refused
                assert response.status_code == 401
                assert response.json()["error"]["code"] == "unauthorized"

            once = await client.get(f"{page}?token={ADMIN_TOKEN}&q=gen_1")
            assert once.status_code == 303
            assert once.headers["location"] == "/dashboard?q=gen_1"
            cookie = once.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie
            assert "Path=/dashboard" in cookie and ADMIN_TOKEN not in cookie
            value = once.cookies["relay_admin"]

            by_cookie = await client.get(page, headers={"cookie": f"relay_admin={value}"})
            by_bearer = await client.get(page, headers=admin_headers())
            for response in (by_cookie, by_bearer):
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/html")
                assert response.headers["cache-control"] == "no-store"
                assert "script-src 'nonce-" in response.headers["content-security-policy"]
                assert ADMIN_TOKEN not in response.text
            # The cookie opens the page only: /metrics takes the bearer token alone.
            metrics = await client.get(
                f"{base}/metrics", headers={"cookie": f"relay_admin={value}"}
            )
            assert metrics.status_code == 401


# --- Escaping and redaction ----------------------------------------------------------------------


async def test_database_values_are_escaped_and_no_query_string_is_shown(
    db_url: str, fake_upstream: tuple[FakeUpstream, str]
) -> None:
    """A receiver's answer with markup is shown escaped, and a callback URL's query string
    (and the token in it) is not shown anywhere on the page."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    markup = "<script>alert('owned')</script><b>bold</b>"
    with serve_receiver({"/evil": markup.encode()}) as receiver:
        receiver.responses["/evil"] = [(500, {}, 0.0)]
        settings = fast_settings(
            db_url, upstream_url, admin_token=ADMIN_TOKEN, delivery_retry_schedule_s=(0.05,)
        )
        gen = final_generation(sim, "gen_escape")
        async with running_relay(settings, key) as client:
            sub = await subscribe(client, gen.id, f"{receiver.url}/evil?token=hunter2secret")
            await wait_status(client, sub["id"], "failed")
            base = str(client.base_url).rstrip("/")
            async with httpx.AsyncClient(timeout=10) as admin:
                overview = await admin.get(f"{base}/dashboard", headers=admin_headers())
                found = await admin.get(
                    f"{base}/dashboard", params={"q": sub["id"]}, headers=admin_headers()
                )
    for page in (overview.text, found.text):
        assert "hunter2secret" not in page
        assert "<script>alert" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;" in found.text
    assert f"{receiver.url}/evil?…" in found.text
    assert "HTTP 500" in overview.text


# --- In a real browser ---------------------------------------------------------------------------


@pytest.fixture
def browser() -> Iterator[object]:
    """Headless Chromium under Selenium, with a fresh profile."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="relay-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


async def test_the_dashboard_in_a_browser_after_callbacks_and_failures(
    db_url: str,
    fake_upstream: tuple[FakeUpstream, str],
    receiver: Receiver,
    browser: object,
) -> None:
    """After callbacks to a healthy receiver and failures at a broken one, the page shows
    the counts, the backlog and its oldest item, the broken receiver with its last error,
    the failures, the chart's totals; the search box finds a subscription and shows its
    attempts as a timeline."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver

    assert isinstance(browser, WebDriver)
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    settings = fast_settings(
        db_url,
        upstream_url,
        admin_token=ADMIN_TOKEN,
        delivery_retry_schedule_s=(0.1, 3600.0),  # the broken ones stay pending after 2 tries
    )
    with serve_receiver() as broken:
        broken.responses["/down"] = [(503, {}, 0.0)]
        async with running_relay(settings, key) as client:
            delivered = [final_generation(sim, f"gen_ok_{i}") for i in range(5)]
            failing = [final_generation(sim, f"gen_down_{i}") for i in range(3)]
            waiting = [pending_generation(sim, f"gen_running_{i}") for i in range(2)]
            subs = [await subscribe(client, g.id, f"{receiver.url}/ok") for g in delivered]
            down = [await subscribe(client, g.id, f"{broken.url}/down") for g in failing]
            for gen in waiting:
                await subscribe(client, gen.id, f"{receiver.url}/ok")
            for sub in subs:
                await wait_status(client, sub["id"], "delivered")
            await wait_for(lambda: len(broken.received) >= 6, timeout_s=10)
            base = str(client.base_url).rstrip("/")

            def page_text() -> str:
                return str(browser.find_element(By.TAG_NAME, "body").text)

            browser.get(f"{base}/dashboard?token={ADMIN_TOKEN}")
            assert browser.current_url == f"{base}/dashboard"  # the token left the address

            def text_of(element_id: str) -> str:
                return str(browser.find_element(By.ID, element_id).text)

            async def settled() -> bool:
                # Attempts are recorded a moment after they end and the page caches for 5 s:
                # wait for a page that read all six failed attempts.
                browser.refresh()
                return (
                    "delivered\n5" in text_of("subscriptions")
                    and "HTTP 503" in text_of("receivers")
                    and text_of("failures").count("HTTP 503") == 6
                )

            try:
                await wait_for(settled, timeout_s=20, interval_s=1)
            except TimeoutError:
                raise AssertionError(page_text()) from None
            subscriptions = text_of("subscriptions")
            assert "active\n5" in subscriptions  # 3 retrying at the broken host, 2 running
            backlog = text_of("backlog")
            assert backlog.startswith("BACKLOG\n3\ncallbacks pending")
            assert "generations being polled\n2" in backlog
            assert down[0]["id"] in backlog or any(d["id"] in backlog for d in down)
            broken_host = broken.url.removeprefix("http://")
            receivers = text_of("receivers")
            assert f"{broken_host} 3" in receivers and "HTTP 503" in receivers
            failures = text_of("failures")
            assert failures.count("HTTP 503") == 6
            chart = text_of("chart")
            assert "delivered 5" in chart and "failed 6" in chart
            bars = browser.find_elements(By.CSS_SELECTOR, "#chart svg rect")
            assert bars, "the chart draws no bar"
            assert "polling\n2" in text_of("polls")
            assert "this node: ok" in text_of("upstream")
            if "sqlite" in db_url:
                update = os.environ.get("RELAY_UPDATE_SCREENSHOT") == "1"
                assert browser.save_screenshot(str(SCREENSHOT if update else LATEST_SCREENSHOT))

            search = browser.find_element(By.ID, "q")
            search.send_keys(down[0]["id"])
            search.submit()
            await wait_for(lambda: browser.find_elements(By.ID, "search"), timeout_s=10)
            timeline = text_of("search")
            assert "subscription created" in timeline
            assert timeline.count("attempt 1: HTTP 503") == 1
            assert "attempt 2: HTTP 503" in timeline and "next attempt due" in timeline
            assert key.name in timeline


def test_the_page_answers_while_the_database_does_not(tmp_path: Path) -> None:
    """With the database gone the page still answers 200, says so, and shows what this
    process knows; /metrics says relay_database_up 0."""
    # A database that cannot be opened (a directory that does not exist): every query fails,
    # however the process's connection pool stands.
    url = f"sqlite+aiosqlite:///{tmp_path}/missing/dir/relay.db"
    settings = fast_settings(url, admin_token=ADMIN_TOKEN)
    with (
        serve_in_thread(create_app(settings, role="api")) as base,
        httpx.Client(timeout=10, headers=admin_headers()) as client,
    ):
        page = client.get(f"{base}/dashboard")
        metrics = client.get(f"{base}/metrics")
    assert page.status_code == 200
    assert "The database does not answer." in page.text
    assert "relay_database_up 0.0" in metrics.text
