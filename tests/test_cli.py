"""The real `relay` command in subprocesses: keys, configuration errors, serve on SQLite.

Each test runs `python -m relay.cli` (the console script's target) with a clean RELAY_*
environment and a SQLite file under tmp_path; every process started here is killed in a
`finally` block, whatever the test's outcome.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from relay.database import hold_sqlite_serve_lock
from tests.helpers import free_port

PUBLIC_HOOK = "http://93.184.216.34/hook"
STARTUP_DEADLINE_S = 45.0  # generous: CI machines are slow and busy


def cli_env(db_path: Path, **variables: str) -> dict[str, str]:
    """The environment without any RELAY_* of the caller's, pointed at `db_path`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["RELAY_DATABASE_URL"] = f"sqlite+aiosqlite:///{db_path}"
    # Polls go nowhere: nothing in these tests may reach the real upstream.
    env["RELAY_UPSTREAM_URL"] = "http://127.0.0.1:9"
    env["RELAY_UPSTREAM_API_KEY"] = "upstream-test-key"
    env.update(variables)
    return env


def relay(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@dataclass
class Serving:
    proc: subprocess.Popen[bytes]
    base_url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_serve(env: dict[str, str], cwd: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "serve", "--port", str(port)],
            env=env,
            cwd=cwd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def wait_healthy(serving: Serving) -> None:
    """Poll /healthz until 200; fail at the deadline or if the process ends."""
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while True:
        if serving.proc.poll() is not None:
            pytest.fail(f"relay serve exited with {serving.proc.returncode}: {serving.log_text()}")
        try:
            if httpx.get(f"{serving.base_url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"relay serve did not answer /healthz in time: {serving.log_text()}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def serving(env: dict[str, str], cwd: Path, log: Path) -> Iterator[Serving]:
    """`relay serve` on a free port, healthy; killed on the way out if still running."""
    port = free_port()
    proc = start_serve(env, cwd, port, log)
    try:
        running = Serving(proc, f"http://127.0.0.1:{port}", log)
        wait_healthy(running)
        yield running
    finally:
        stop(proc)


@dataclass
class Workspace:
    dir: Path
    db: Path
    env: dict[str, str]

    def relay(self, *args: str) -> subprocess.CompletedProcess[str]:
        return relay(*args, env=self.env, cwd=self.dir)


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    db = tmp_path / "relay.db"
    return Workspace(tmp_path, db, cli_env(db))


def create_key(ws: Workspace, name: str = "demo") -> dict[str, str]:
    done = ws.relay("keys", "create", "--name", name, "--json")
    assert done.returncode == 0, done.stderr
    key: dict[str, str] = json.loads(done.stdout)
    return key


# --- keys -----------------------------------------------------------------------------------


def test_console_script_is_installed() -> None:
    """The `relay` console script sits beside this Python and answers --version."""
    script = Path(sys.executable).parent / "relay"
    assert script.exists(), script
    done = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("relay ")


def test_keys_create_json_prints_the_key_once_and_stores_only_a_hash(ws: Workspace) -> None:
    """`keys create --json` prints exactly id, name, api_key, signing_secret; the db has no key."""
    key = create_key(ws)
    assert set(key) == {"id", "name", "api_key", "signing_secret"}
    assert key["name"] == "demo"
    assert key["id"] and key["api_key"]
    assert key["signing_secret"].startswith("whsec_")
    assert len(base64.b64decode(key["signing_secret"].removeprefix("whsec_"), validate=True)) == 32
    files = [p for p in ws.dir.iterdir() if p.name.startswith("relay.db")]
    assert ws.db in files
    for path in files:
        assert key["api_key"].encode() not in path.read_bytes(), path.name


def test_keys_list_json_shows_keys_without_secrets_and_revocations(ws: Workspace) -> None:
    """`keys list --json` shows each key by id and name, never its secrets; revoke marks it."""
    first = create_key(ws, "first")
    second = create_key(ws, "second")
    done = ws.relay("keys", "list", "--json")
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert [(k["id"], k["name"]) for k in listed] == sorted(
        [(first["id"], "first"), (second["id"], "second")]
    )
    assert all(k["revoked_at"] is None for k in listed)
    assert all("api_key" not in k and "signing_secret" not in k for k in listed)
    for key in (first, second):
        assert key["api_key"] not in done.stdout
        assert key["signing_secret"] not in done.stdout

    revoked = ws.relay("keys", "revoke", first["id"])
    assert revoked.returncode == 0, revoked.stderr
    after = {k["id"]: k for k in json.loads(ws.relay("keys", "list", "--json").stdout)}
    assert after[first["id"]]["revoked_at"] is not None
    assert after[second["id"]]["revoked_at"] is None


def test_keys_revoke_of_an_unknown_id_exits_2_with_one_line(ws: Workspace) -> None:
    """Revoking an id that does not exist exits 2 with one stderr line naming the id."""
    done = ws.relay("keys", "revoke", "key_NOPE")
    assert done.returncode == 2
    lines = stderr_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert "key_NOPE" in lines[0]


# --- bad configuration and arguments -------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RELAY_POLL_MIN_INTERVAL", "abc"),
        ("RELAY_PORT", "99999"),
        ("RELAY_DATABASE_URL", "mysql://x"),
        ("RELAY_DELIVERY_RETRY_SCHEDULE", "1,x"),
        ("RELAY_ALLOW_PRIVATE_CALLBACKS", "maybe"),
        ("RELAY_RATE_LIMIT", "-1"),
        ("RELAY_UPSTREAM_URL", "ftp://upstream"),
    ],
)
def test_bad_configuration_stops_serve_with_one_line_and_exit_2(
    ws: Workspace, variable: str, value: str
) -> None:
    """A bad RELAY_* value makes `relay serve` exit 2 with one stderr line naming it."""
    env = {**ws.env, variable: value}
    done = relay("serve", "--port", str(free_port()), env=env, cwd=ws.dir)
    assert done.returncode == 2, done.stderr
    lines = stderr_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert variable in lines[0]
    assert done.stdout == ""


def test_bad_configuration_stops_the_other_commands_too(ws: Workspace) -> None:
    """`relay migrate` and `relay keys` refuse a bad RELAY_* value the same way."""
    env = {**ws.env, "RELAY_UPSTREAM_TIMEOUT": "-3"}
    for args in (["migrate"], ["keys", "list"]):
        done = relay(*args, env=env, cwd=ws.dir)
        assert done.returncode == 2, done.stderr
        lines = stderr_lines(done.stderr)
        assert len(lines) == 1, done.stderr
        assert "RELAY_UPSTREAM_TIMEOUT" in lines[0]
    assert not ws.db.exists()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ([], "command"),
        (["bogus"], "bogus"),
        (["serve", "--port", "abc"], "--port"),
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--role", "boss"], "--role"),
        (["serve", "--unknown"], "--unknown"),
        (["keys"], "keys_command"),
        (["keys", "create"], "--name"),
        (["keys", "revoke"], "id"),
        (["keys", "create", "--name", " "], "--name"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(ws: Workspace, args: list[str], named: str) -> None:
    """Bad arguments exit 2 with one stderr line naming what is wrong."""
    done = ws.relay(*args)
    assert done.returncode == 2, done.stderr
    lines = stderr_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert named in lines[0]


# --- serve on SQLite ------------------------------------------------------------------------


def test_serve_is_single_process_on_sqlite_and_keys_work_beside_it(ws: Workspace) -> None:
    """A second serve on the file exits non-zero with one line; keys and revoke work beside."""
    with serving(ws.env, ws.dir, ws.dir / "serve.log") as first:
        # A second serve on the same file, on another port, is refused within seconds.
        started = time.monotonic()
        second = relay("serve", "--port", str(free_port()), env=ws.env, cwd=ws.dir)
        assert second.returncode != 0
        assert time.monotonic() - started < 30
        lines = stderr_lines(second.stderr)
        assert len(lines) == 1, second.stderr
        assert "single-process" in lines[0]
        assert first.proc.poll() is None

        # `relay keys` runs beside the serve, and its keys work on the served API at once.
        key = create_key(ws)
        listed = ws.relay("keys", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert key["id"] in [k["id"] for k in json.loads(listed.stdout)]
        auth = {"authorization": f"Bearer {key['api_key']}"}
        created = httpx.post(
            f"{first.base_url}/v1/subscriptions",
            json={"generation_id": "gen_cli", "callback_url": PUBLIC_HOOK},
            headers=auth,
            timeout=10,
        )
        assert created.status_code == 201, created.text

        # A key revoked from the command line is refused by the running serve at once.
        revoked = ws.relay("keys", "revoke", key["id"])
        assert revoked.returncode == 0, revoked.stderr
        refused = httpx.get(f"{first.base_url}/v1/subscriptions", headers=auth, timeout=10)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "unauthorized"

        migrated = ws.relay("migrate")
        assert migrated.returncode == 0, migrated.stderr
        assert first.proc.poll() is None


def test_serve_stops_cleanly_on_sigterm(ws: Workspace) -> None:
    """SIGTERM ends `relay serve` promptly, through its shutdown, releasing the SQLite lock."""
    with serving(ws.env, ws.dir, ws.dir / "serve.log") as running:
        running.proc.send_signal(signal.SIGTERM)
        returncode = running.proc.wait(timeout=30)
        log = running.log_text()
        # uvicorn re-raises the signal after a graceful shutdown, so -SIGTERM is clean too.
        assert returncode in (0, -signal.SIGTERM), log
        assert "Traceback" not in log
        assert "relay stopped" in log
    lock = hold_sqlite_serve_lock(f"sqlite+aiosqlite:///{ws.db}")
    assert lock is not None
    lock.close()


def test_serve_through_a_symlink_is_still_refused_beside_a_running_serve(ws: Workspace) -> None:
    """The single-process guard follows symlinks: another path to the same file is refused."""
    link = ws.dir / "link.db"
    link.symlink_to(ws.db)
    with serving(ws.env, ws.dir, ws.dir / "serve.log") as first:
        env = {**ws.env, "RELAY_DATABASE_URL": f"sqlite+aiosqlite:///{link}"}
        second = relay("serve", "--port", str(free_port()), env=env, cwd=ws.dir)
        assert second.returncode != 0
        lines = stderr_lines(second.stderr)
        assert len(lines) == 1 and "single-process" in lines[0], second.stderr
        assert first.proc.poll() is None


def test_serve_on_a_port_in_use_exits_2_with_one_line(ws: Workspace) -> None:
    """A taken port is one line and exit code 2, before any worker starts."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = relay("serve", "--port", str(port), env=ws.env, cwd=ws.dir)
    assert result.returncode == 2
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], result.stderr


def test_serve_on_a_sqlite_path_in_a_missing_folder_exits_2_with_one_line(ws: Workspace) -> None:
    """A database path that cannot be opened is one clear line, not a traceback."""
    env = {**ws.env, "RELAY_DATABASE_URL": "sqlite+aiosqlite:////nonexistent/folder/relay.db"}
    result = relay("serve", "--port", str(free_port()), env=env, cwd=ws.dir)
    assert result.returncode == 2
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1 and "/nonexistent/folder/relay.db" in lines[0], result.stderr
