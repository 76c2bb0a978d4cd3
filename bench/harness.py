"""Processes on loopback: relay nodes, the upstream simulator and receivers, for the benchmarks.
Every process is started with its own log file and killed at exit."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    url: str
    popen: subprocess.Popen[bytes] | None = None

    def start(self, ready_path: str = "/healthz", timeout_s: float = 30.0) -> Proc:
        log = open(self.log_path, "ab")  # noqa: SIM115 (owned by the child process)
        self.popen = subprocess.Popen(
            self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited early; see {self.log_path}:\n{self.tail()}")
            try:
                if httpx.get(self.url + ready_path, timeout=1).status_code < 500:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not become ready; see {self.log_path}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid


@dataclass
class Cluster:
    """Processes started in a work folder; all killed on exit."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def relay(self, name: str, env: Mapping[str, str], role: str = "all") -> Proc:
        port = free_port()
        full_env = {**os.environ, **env, "RELAY_PORT": str(port), "RELAY_HOST": "127.0.0.1"}
        proc = Proc(
            name,
            [sys.executable, "-m", "relay.cli", "serve", "--role", role],
            full_env,
            self.workdir / f"{name}.log",
            f"http://127.0.0.1:{port}",
        )
        self.procs.append(proc)
        return proc

    def fake_upstream(self, api_key: str, seed: int = 1, time_scale: float = 1.0) -> Proc:
        port = free_port()
        env = {
            **os.environ,
            "RELAY_FAKE_API_KEY": api_key,
            "RELAY_FAKE_SEED": str(seed),
            "RELAY_FAKE_TIME_SCALE": str(time_scale),
        }
        proc = Proc(
            "fake-upstream",
            [sys.executable, "-m", "relay.cli", "fake-upstream", "--port", str(port)],
            env,
            self.workdir / "fake-upstream.log",
            f"http://127.0.0.1:{port}",
        )
        self.procs.append(proc)
        return proc.start(ready_path="/_fake/stats")

    def receiver(self, name: str = "receiver", host: str = "127.0.0.1") -> Proc:
        """A receiver process; host 0.0.0.0 lets callbacks reach it as 127.0.0.N, so one
        process can stand for several receiver hosts."""
        port = free_port()
        proc = Proc(
            name,
            [sys.executable, "-m", "bench.receiver", "--host", host, "--port", str(port)],
            dict(os.environ),
            self.workdir / f"{name}.log",
            f"http://127.0.0.1:{port}",
        )
        self.procs.append(proc)
        return proc.start(ready_path="/_stats")

    def bare_ingest(self, database_url: str) -> Proc:
        """The baseline handler of the ingest benchmark (bench/bare_ingest.py)."""
        port = free_port()
        proc = Proc(
            "bare-ingest",
            [
                sys.executable,
                "-m",
                "bench.bare_ingest",
                "--port",
                str(port),
                "--database-url",
                database_url,
            ],
            dict(os.environ),
            self.workdir / "bare-ingest.log",
            f"http://127.0.0.1:{port}",
        )
        self.procs.append(proc)
        return proc.start()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.kill(signal.SIGTERM)


@contextlib.contextmanager
def cluster(workdir: Path) -> Iterator[Cluster]:
    workdir.mkdir(parents=True, exist_ok=True)
    c = Cluster(workdir)
    try:
        yield c
    finally:
        c.stop()


def create_key(database_url: str, name: str = "bench") -> dict[str, str]:
    """A client key made with the real CLI; returns its --json output."""
    import json

    out = subprocess.run(
        [sys.executable, "-m", "relay.cli", "keys", "create", "--name", name, "--json"],
        env={**os.environ, "RELAY_DATABASE_URL": database_url},
        capture_output=True,
        check=True,
        cwd=ROOT,
    )
    return dict(json.loads(out.stdout))
