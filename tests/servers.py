"""Real servers on loopback for tests: any ASGI app under uvicorn in a thread, on port 0;
and `relay serve` as a real process, for the crash tests that SIGKILL it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from bench.harness import free_port


class _ThreadedServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the main thread owns signals
        pass


@contextlib.contextmanager
def serve_in_thread(
    app: Any, host: str = "127.0.0.1", startup_timeout_s: float = 10.0
) -> Iterator[str]:
    """Run `app` under uvicorn on a free port; yield its base URL (no trailing slash)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = _ThreadedServer(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def log_tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-3000:]


@contextlib.asynccontextmanager
async def relay_process(
    env: dict[str, str], log_path: Path, startup_timeout_s: float = 20.0
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`relay serve` as a real process (its output appended to `log_path`); yields it and its
    base URL once /healthz answers, and stops it on exit unless the test killed it."""
    port = free_port()
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay.cli",
            "serve",
            "--port",
            str(port),
            env={**os.environ, **env},
            stdout=log,
            stderr=log,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        async with asyncio.timeout(startup_timeout_s), httpx.AsyncClient(timeout=1) as probe:
            while True:
                assert process.returncode is None, log_tail(log_path)
                with contextlib.suppress(httpx.TransportError):
                    if (await probe.get(f"{base_url}/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
        yield process, base_url
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
