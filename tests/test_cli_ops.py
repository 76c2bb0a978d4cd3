"""`relay subscriptions list|show|redeliver` and `relay stats`: the real command in
subprocesses, on the database a real relay wrote (both databases), every key's subscriptions.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

from relay.simulator import FakeUpstream
from tests.delivery import (
    final_generation,
    pending_generation,
    running_relay,
    subscribe,
    wait_status,
)
from tests.helpers import ROOT, Receiver, fast_settings, new_key, wait_for


def relay_cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["RELAY_DATABASE_URL"] = db_url
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def cli_json(db_url: str, *args: str) -> Any:
    done = await asyncio.to_thread(relay_cli, db_url, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def cli_fails(db_url: str, *args: str) -> str:
    """The command's one line on stderr; it must exit 2 with nothing on stdout."""
    done = await asyncio.to_thread(relay_cli, db_url, *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.stderr
    return done.stderr.strip()


async def test_subscriptions_and_stats_from_the_command_line(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """list filters every key's subscriptions and hides query strings; show prints the
    attempts as a timeline; redeliver queues the stored result again; stats prints the
    dashboard's numbers; unknown ids and nothing to redeliver are one line and exit 2."""
    sim, upstream_url = fake_upstream
    alice, bob = await new_key(db_url, "alice"), await new_key(db_url, "bob")
    settings = fast_settings(db_url, upstream_url, delivery_retry_schedule_s=(3600.0,))
    receiver.responses["/down"] = [(500, {}, 0.0)]
    async with running_relay(settings, alice) as as_alice:
        ok = await subscribe(as_alice, final_generation(sim, "gen_cli_ok").id, f"{receiver.url}/ok")
        down = await subscribe(
            as_alice, final_generation(sim, "gen_cli_down").id, f"{receiver.url}/down?sig=s3cret"
        )
        as_alice.headers["authorization"] = f"Bearer {bob.api_key}"
        waiting = await subscribe(
            as_alice, pending_generation(sim, "gen_cli_wait").id, f"{receiver.url}/ok"
        )
        as_alice.headers["authorization"] = f"Bearer {alice.api_key}"
        await wait_status(as_alice, ok["id"], "delivered")
        await wait_for(lambda: receiver.on("/down"), timeout_s=10)
        await asyncio.sleep(0.3)  # the failed attempt's record

        listed = await cli_json(db_url, "subscriptions", "list")
        assert [item["id"] for item in listed] == [waiting["id"], down["id"], ok["id"]]
        assert {item["key"] for item in listed} == {"alice", "bob"}
        assert listed[1]["callback_url"] == f"{receiver.url}/down?…"
        delivered = await cli_json(db_url, "subscriptions", "list", "--status", "delivered")
        assert [item["id"] for item in delivered] == [ok["id"]]
        by_generation = await cli_json(
            db_url, "subscriptions", "list", "--generation", "gen_cli_wait"
        )
        assert [item["id"] for item in by_generation] == [waiting["id"]]
        table = await asyncio.to_thread(relay_cli, db_url, "subscriptions", "list")
        assert table.stdout.splitlines()[0].split() == [
            "id",
            "status",
            "attempts",
            "generation",
            "key",
            "created",
            "callback",
        ]
        assert "s3cret" not in table.stdout

        shown = await cli_json(db_url, "subscriptions", "show", down["id"])
        assert shown["subscription"]["status"] == "active"
        assert [(a["attempt"], a["status_code"]) for a in shown["attempts"]] == [(1, 500)]
        assert shown["deliveries"][0]["status"] == "pending"
        text = await asyncio.to_thread(relay_cli, db_url, "subscriptions", "show", down["id"])
        assert "timeline:" in text.stdout and "attempt 1: HTTP 500" in text.stdout
        assert "next attempt due" in text.stdout and "s3cret" not in text.stdout

        numbers = await cli_json(db_url, "stats")
        assert numbers["subscriptions"]["delivered"] == 1
        assert numbers["subscriptions"]["active"] == 2
        assert numbers["pending_deliveries"] == 1 and numbers["pending_generations"] == 1
        assert numbers["oldest_pending_subscription_id"] == down["id"]
        assert numbers["last_hour"] == {"delivered": 1, "failed": 1}
        assert [r["host"] for r in numbers["receivers"]] == [receiver.url.removeprefix("http://")]
        stats_table = await asyncio.to_thread(relay_cli, db_url, "stats")
        assert "pending callbacks  1" in stats_table.stdout

        # Redelivered by the operator, sent by the running relay.
        again = await asyncio.to_thread(relay_cli, db_url, "subscriptions", "redeliver", ok["id"])
        assert again.returncode == 0 and "queued" in again.stdout, again.stderr
        await wait_for(lambda: len(receiver.on("/ok")) == 2, timeout_s=10)
        first, second = receiver.on("/ok")
        assert first.headers["webhook-id"] == second.headers["webhook-id"]

    assert "no subscription with id sub_nope" in await cli_fails(
        db_url, "subscriptions", "show", "sub_nope"
    )
    assert "no subscription" in await cli_fails(db_url, "subscriptions", "redeliver", "sub_nope")
    assert "nothing to redeliver" in await cli_fails(
        db_url, "subscriptions", "redeliver", waiting["id"]
    )
    assert "--limit" in await cli_fails(db_url, "subscriptions", "list", "--limit", "0")
    assert "invalid choice" in await cli_fails(db_url, "subscriptions", "list", "--status", "x")
