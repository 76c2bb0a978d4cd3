"""/metrics: Prometheus text parsed with prometheus_client's own parser, counters that move as
polls and callbacks happen, backlog gauges read from the database, the admin token.

The relay runs in-process on a real socket against the simulator and real receivers, on both
databases; `Metrics` and the lease takeover claim are also checked on their own.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay import admin, store
from relay.app import create_app
from relay.database import Database
from relay.metrics import HINT_OUTCOMES, POLL_OUTCOMES, Metrics, attempt_class
from relay.simulator import FakeUpstream
from relay.store import seeding
from tests.delivery import final_generation, running_relay, subscribe, wait_status
from tests.helpers import (
    ADMIN_TOKEN,
    Receiver,
    admin_headers,
    fast_settings,
    new_key,
    queue_final_deliveries,
    serve_in_thread,
    wait_for,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(base: str) -> Samples:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{base}/metrics", headers=admin_headers())
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse(response.text)


# --- Metrics on its own --------------------------------------------------------------------------


def test_disabled_metrics_collect_nothing() -> None:
    """Without the admin token every call is a no-op and nothing is exposed."""
    metrics = Metrics(enabled=False)
    metrics.poll("ok")
    metrics.attempt(200, None, 12, "done", timedelta(seconds=1))
    metrics.hint("accepted")
    assert parse(metrics.exposition().decode()) == {}
    assert metrics.counts("relay_hints") == {}


def test_every_labelled_series_exists_at_zero_with_fixed_labels() -> None:
    """Label values come from fixed sets (no host, key, id or URL) and start at 0."""
    samples = parse(Metrics(enabled=True, version="9.9").exposition().decode())
    for outcome in POLL_OUTCOMES:
        assert ("relay_polls_total", (("outcome", outcome),)) in samples
    for outcome in HINT_OUTCOMES:
        assert value(samples, "relay_hints_total", outcome=outcome) == 0
    assert value(samples, "relay_build_info", version="9.9") == 1
    label_names = {name for (_, labels) in samples for name, _ in labels}
    assert label_names <= {"outcome", "class", "event", "work", "state", "version", "le"}


def test_hints_sweeps_and_takeovers_count_through_the_api() -> None:
    """hint(), sweep() and takeovers() move their counters; a 429 sweep is an upstream 429."""
    metrics = Metrics(enabled=True)
    for outcome in ("accepted", "accepted", "duplicate", "refused"):
        metrics.hint(outcome)
    metrics.sweep("ok")
    metrics.sweep("rate_limited")
    metrics.poll("rate_limited")
    metrics.upstream_paused(2.0)
    metrics.takeovers("delivery", ["node_a", None, "node_b"])
    samples = parse(metrics.exposition().decode())
    assert value(samples, "relay_hints_total", outcome="accepted") == 2
    assert value(samples, "relay_hints_total", outcome="refused") == 1
    assert value(samples, "relay_sweeps_total", outcome="rate_limited") == 1
    assert value(samples, "relay_upstream_rate_limited_total") == 2
    assert value(samples, "relay_upstream_pause_seconds_sum") == 2.0
    assert value(samples, "relay_lease_takeovers_total", work="delivery") == 2
    assert value(samples, "relay_lease_takeovers_total", work="poll") == 0
    assert metrics.counts("relay_hints") == {"accepted": 2, "duplicate": 1, "refused": 1}


@pytest.mark.parametrize(
    ("status_code", "error", "expected"),
    [
        (204, None, "2xx"),
        (302, None, "3xx"),
        (410, None, "4xx"),
        (503, None, "5xx"),
        (None, "timed out after 15 s", "timeout"),
        (None, "connection failed: refused", "network"),
    ],
)
def test_attempt_classes(status_code: int | None, error: str | None, expected: str) -> None:
    """An attempt is classed by its status family, or by why no answer came."""
    assert attempt_class(status_code, error) == expected


# --- Counters moving end to end ------------------------------------------------------------------


async def test_counters_move_as_polls_and_callbacks_happen(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """Polls, ended generations, callback attempts by outcome and class, callback latency and
    detection delay are counted as they happen."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    settings = fast_settings(db_url, upstream_url, admin_token=ADMIN_TOKEN)
    receiver.responses["/flaky"] = [(500, {}, 0.0), (200, {}, 0.0)]
    async with running_relay(settings, key) as client:
        base = str(client.base_url).rstrip("/")
        before = await scrape(base)
        assert (
            value(before, "relay_delivery_attempts_total", outcome="delivered", **{"class": "2xx"})
            == 0
        )
        first = final_generation(sim, "gen_metrics_ok")
        second = final_generation(sim, "gen_metrics_flaky")
        subs = [
            await subscribe(client, first.id, f"{receiver.url}/ok"),
            await subscribe(client, second.id, f"{receiver.url}/flaky"),
        ]
        for sub in subs:
            await wait_status(client, sub["id"], "delivered")
        after = await scrape(base)

    assert value(after, "relay_polls_total", outcome="ok") >= 2
    assert value(after, "relay_generations_ended_total", event="completed") == 2
    delivered = value(
        after, "relay_delivery_attempts_total", outcome="delivered", **{"class": "2xx"}
    )
    retried = value(after, "relay_delivery_attempts_total", outcome="retry", **{"class": "5xx"})
    assert (delivered, retried) == (2, 1)
    assert value(after, "relay_callback_duration_seconds_count") == 3
    assert value(after, "relay_detection_delay_seconds_count") == 2
    # The flaky one waited for its retry (0.1 s at least) before its 2xx.
    assert value(after, "relay_detection_delay_seconds_sum") >= 0.1
    assert value(after, "relay_upstream_state", state="ok") == 1


# --- Backlog gauges ------------------------------------------------------------------------------


async def test_backlog_gauges_are_cluster_wide_and_cached(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two API nodes on one database report the same backlog, read from the database; a read
    is reused until it is BACKLOG_MAX_AGE_S old."""
    monkeypatch.setattr(admin, "BACKLOG_MAX_AGE_S", 2.0)
    key = await new_key(db_url)
    await queue_final_deliveries(
        db_url, key, {f"gen_backlog_{i}": f"http://127.0.0.1:9/hook/{i}" for i in range(3)}
    )
    settings = fast_settings(db_url, admin_token=ADMIN_TOKEN)
    # role api: no worker drains the backlog while it is looked at.
    with (
        serve_in_thread(create_app(settings, role="api")) as one,
        serve_in_thread(create_app(settings, role="api")) as two,
    ):
        for base in (one, two):
            samples = await scrape(base)
            assert value(samples, "relay_pending_deliveries") == 3
            assert value(samples, "relay_pending_generations") == 0
            assert value(samples, "relay_database_up") == 1
            assert value(samples, "relay_oldest_pending_delivery_age_seconds") >= 0
        await queue_final_deliveries(db_url, key, {"gen_backlog_late": "http://127.0.0.1:9/x"})
        assert value(await scrape(one), "relay_pending_deliveries") == 3  # cached

        async def caught_up() -> bool:
            return value(await scrape(one), "relay_pending_deliveries") == 4

        await wait_for(caught_up, timeout_s=5)


# --- Lease takeovers -----------------------------------------------------------------------------


async def test_a_claim_after_a_lease_ran_out_names_the_previous_owner(db: Database) -> None:
    """Claiming work whose lease ran out reports the node that held it: a takeover."""
    key = await store.create_key(db, "takeover")
    await seeding.add_polling_generations(
        db,
        key.id,
        {"gen_takeover": "http://127.0.0.1:9/hook"},
        status="IN_PROGRESS",
        next_poll_at=db.now(),
    )
    (first,) = await store.claim_due_generations(db, "node_a", 10, lease_s=0.05)
    assert first.previous_owner is None
    await asyncio.sleep(0.2)
    (second,) = await store.claim_due_generations(db, "node_b", 10, lease_s=5)
    assert second.previous_owner == "node_a"
    assert await store.claim_due_generations(db, "node_c", 10, lease_s=5) == []


# --- The admin token -----------------------------------------------------------------------------


async def test_metrics_need_the_admin_token(db_url: str) -> None:
    """/metrics is 404 without RELAY_ADMIN_TOKEN, 401 without the right bearer token."""
    async with httpx.AsyncClient(timeout=10) as client:
        with serve_in_thread(create_app(fast_settings(db_url), role="api")) as base:
            response = await client.get(f"{base}/metrics", headers=admin_headers())
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "not_found"
        settings = fast_settings(db_url, admin_token=ADMIN_TOKEN)
        with serve_in_thread(create_app(settings, role="api")) as base:
            refused = [
                {},
                admin_headers("wrong-token-wrong-token-wrong"),
                admin_headers(ADMIN_TOKEN + "x"),
                {"authorization": f"Basic {ADMIN_TOKEN}"},
                {"cookie": f"relay_admin={ADMIN_TOKEN}"},
            ]
            for headers in refused:
                response = await client.get(f"{base}/metrics", headers=headers)
                assert response.status_code == 401, headers
                assert response.json()["error"]["code"] == "unauthorized"
                assert response.headers["www-authenticate"].startswith("Bearer")
                assert ADMIN_TOKEN not in response.text
            assert (await client.get(f"{base}/metrics", headers=admin_headers())).status_code == 200
            assert (
                await client.post(f"{base}/metrics", headers=admin_headers())
            ).status_code == 405
