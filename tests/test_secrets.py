"""Signing secrets at rest and in rotation: never stored, logged or shown in the clear; a
rotation signs with both secrets for its overlap, verified by the independent
`standardwebhooks` package; and the command line around RELAY_SECRET_KEY (the SQLite key
file, PostgreSQL without a key, a lost key)."""

from __future__ import annotations

import json
import logging
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from relay import store
from relay.models import metadata
from relay.simulator import FakeUpstream
from tests.delivery import final_generation, running_relay, subscribe, wait_status
from tests.helpers import (
    Receiver,
    fast_settings,
    new_key,
    open_test_database,
    wait_for,
)
from tests.test_cli import Workspace, cli_env, create_key, relay, serving, stderr_lines


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    """A directory with a SQLite database path and an environment free of the caller's
    RELAY_* (no RELAY_SECRET_KEY: the key file is in play)."""
    db = tmp_path / "relay.db"
    return Workspace(tmp_path, db, cli_env(db))


async def _every_row_as_text(db_url: str) -> str:
    db = open_test_database(db_url)
    try:
        async with db.reader() as conn:
            dumps: list[str] = []
            for table in metadata.sorted_tables:
                rows = await conn.execute(text(f"SELECT * FROM {table.name}"))
                dumps.extend(repr(tuple(row)) for row in rows)
    finally:
        await db.dispose()
    return "\n".join(dumps)


async def test_a_secret_is_never_in_the_database_or_the_logs_in_the_clear(
    db_url: str,
    fake_upstream: tuple[FakeUpstream, str],
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After a signed callback went out, no row of any table, no byte of the SQLite files
    and no log line holds the signing secret (or the API key), and the callback verifies."""
    caplog.set_level(logging.DEBUG)
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    gen = final_generation(sim, "gen_secret")
    async with running_relay(fast_settings(db_url, upstream_url), key) as client:
        sub = await subscribe(client, gen.id, f"{receiver.url}/hook")
        await wait_status(client, sub["id"], "delivered")
    Webhook(key.signing_secret).verify(
        receiver.on("/hook")[0].body, receiver.on("/hook")[0].headers
    )
    secret_bytes = key.signing_secret.removeprefix("whsec_")
    rows = await _every_row_as_text(db_url)
    assert key.id in rows  # the dump is real
    for needle in (key.signing_secret, secret_bytes, key.api_key):
        assert needle not in rows
        assert needle not in caplog.text
        assert needle not in repr(key)
    if db_url.startswith("sqlite"):
        path = Path(db_url.removeprefix("sqlite+aiosqlite:///"))
        for file in path.parent.glob(path.name + "*"):
            assert secret_bytes.encode() not in file.read_bytes(), file


async def test_a_rotation_signs_with_both_secrets_for_its_overlap_then_the_new_alone(
    db_url: str, fake_upstream: tuple[FakeUpstream, str], receiver: Receiver
) -> None:
    """During the overlap a callback carries two signatures (new first) and verifies with
    either secret; a redelivery after it carries one, which the old secret no longer
    verifies."""
    sim, upstream_url = fake_upstream
    key = await new_key(db_url)
    db = open_test_database(db_url)
    try:
        rotated = await store.rotate_secret(db, key.id, overlap_s=3.0)
    finally:
        await db.dispose()
    assert rotated is not None and rotated.signing_secret != key.signing_secret
    assert rotated.overlap_until is not None and rotated.overlap_until > datetime.now(UTC)
    assert rotated.signing_secret not in repr(rotated)
    gen = final_generation(sim, "gen_rotate")
    async with running_relay(fast_settings(db_url, upstream_url), key) as client:
        sub = await subscribe(client, gen.id, f"{receiver.url}/hook")
        await wait_status(client, sub["id"], "delivered")
        first = receiver.on("/hook")[0]
        signatures = first.headers["webhook-signature"].split(" ")
        assert len(signatures) == 2
        Webhook(rotated.signing_secret).verify(first.body, first.headers)
        Webhook(key.signing_secret).verify(first.body, first.headers)
        # The new secret's signature comes first.
        new_only = {**first.headers, "webhook-signature": signatures[0]}
        Webhook(rotated.signing_secret).verify(first.body, new_only)

        await wait_for(lambda: datetime.now(UTC) > rotated.overlap_until, timeout_s=10)
        again = await client.post(f"/v1/subscriptions/{sub['id']}/redeliver")
        assert again.status_code == 202, again.text
        await wait_for(lambda: len(receiver.on("/hook")) == 2, timeout_s=10)
    second = receiver.on("/hook")[1]
    assert len(second.headers["webhook-signature"].split(" ")) == 1
    Webhook(rotated.signing_secret).verify(second.body, second.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(key.signing_secret).verify(second.body, second.headers)


# --- The command line ------------------------------------------------------------------------


def test_sqlite_key_file_is_made_once_with_mode_0600_and_reused(ws: Workspace) -> None:
    """The first `relay keys create` makes relay.db.secret (0600); `serve` reuses it and
    signs with the secret printed; the database holds the secret only sealed."""
    key = create_key(ws)
    key_file = ws.dir / "relay.db.secret"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    content = key_file.read_text()
    assert len(content.strip()) >= 32
    again = create_key(ws, "second")
    assert key_file.read_text() == content
    for file in ws.dir.glob("relay.db*"):
        if file != key_file:
            data = file.read_bytes()
            for secret in (key["signing_secret"], again["signing_secret"]):
                assert secret.removeprefix("whsec_").encode() not in data, file
    with serving(ws.env, ws.dir, ws.dir / "serve.log"):
        pass
    assert key_file.read_text() == content


def test_rotate_secret_json_prints_the_new_secret_and_the_overlap_end(ws: Workspace) -> None:
    """`relay keys rotate-secret ID --overlap 60 --json` prints id, signing_secret and
    overlap_until; `--overlap 0` prints null; an unknown id or a bad overlap exits 2."""
    key = create_key(ws)
    done = ws.relay("keys", "rotate-secret", key["id"], "--overlap", "60", "--json")
    assert done.returncode == 0, done.stderr
    rotated = json.loads(done.stdout)
    assert set(rotated) == {"id", "signing_secret", "overlap_until"}
    assert rotated["id"] == key["id"]
    assert rotated["signing_secret"].startswith("whsec_")
    assert rotated["signing_secret"] != key["signing_secret"]
    until = datetime.fromisoformat(rotated["overlap_until"])
    assert 50 < (until - datetime.now(UTC)).total_seconds() < 70
    done = ws.relay("keys", "rotate-secret", key["id"], "--overlap", "0", "--json")
    assert json.loads(done.stdout)["overlap_until"] is None
    for args in (["key_NOPE"], [key["id"], "--overlap", "-1"], [key["id"], "--overlap", "x"]):
        refused = ws.relay("keys", "rotate-secret", *args)
        assert refused.returncode == 2
        assert len(stderr_lines(refused.stderr)) == 1, refused.stderr


def test_a_lost_secret_key_stops_serve_with_one_line_and_reset_secrets_recovers(
    ws: Workspace,
) -> None:
    """With the key file lost (a new one is made), `serve` exits 2 with one line saying what
    to do; `relay keys reset-secrets --json` gives every live key a new secret, and then
    `serve` starts."""
    key = create_key(ws)
    (ws.dir / "relay.db.secret").unlink()
    done = ws.relay("serve", "--port", "0")
    assert done.returncode == 2
    lines = stderr_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert "cannot open the stored signing secrets" in lines[0]
    assert "reset-secrets" in lines[0]
    reset = ws.relay("keys", "reset-secrets", "--json")
    assert reset.returncode == 0, reset.stderr
    (fresh,) = json.loads(reset.stdout)
    assert fresh["id"] == key["id"]
    assert fresh["signing_secret"].startswith("whsec_")
    assert fresh["signing_secret"] != key["signing_secret"]
    with serving(ws.env, ws.dir, ws.dir / "serve.log"):
        pass


@pytest.mark.parametrize(
    ("variables", "words"),
    [
        ({"RELAY_SECRET_KEY": "short"}, "at least 32 characters"),
        # Refused before any connection: this database need not exist.
        (
            {"RELAY_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:5432/relay_none"},
            "required with PostgreSQL",
        ),
    ],
)
def test_bad_or_missing_secret_key_stops_serve_with_one_line(
    ws: Workspace, variables: dict[str, str], words: str
) -> None:
    """A RELAY_SECRET_KEY under 32 characters, or none with PostgreSQL, stops `serve` at
    start: exit 2, one line naming RELAY_SECRET_KEY, the value not shown."""
    done = relay("serve", "--port", "0", env={**ws.env, **variables}, cwd=ws.dir)
    assert done.returncode == 2
    lines = stderr_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert "RELAY_SECRET_KEY" in lines[0] and words in lines[0]
    assert "'short'" not in lines[0]
