"""A PostgreSQL cluster of a test's own, to stop and start: the machine's shared server is
never stopped (other tests use it at the same time).

`private_postgres()` runs initdb into a temporary directory and pg_ctl on a free port, as the
`postgres` OS user (the server refuses to run as root); the binaries are Debian's, under
/usr/lib/postgresql/*/bin. Skipped where they or the user are missing, or when not root.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import free_port


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


@dataclass
class PrivatePostgres:
    """A running cluster: `url` reaches its `relay` database as the postgres user."""

    data_dir: Path
    port: int
    bin_dir: Path

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/relay"

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(self.bin_dir / "pg_ctl"),
                "-D",
                str(self.data_dir),
                *args,
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1"
        log = str(self.data_dir / "server.log")
        self._pg_ctl("-o", options, "-l", log, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop it: `fast` disconnects every client at once, as an operator's restart does."""
        self._pg_ctl("-m", mode, "-w", "stop")


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A new cluster on a free port with a `relay` database; removed afterwards."""
    bin_dir = _bin_dir()
    if bin_dir is None or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL's server binaries (or runuser) are not installed")
    if os.geteuid() != 0:
        pytest.skip("starting a private PostgreSQL cluster needs root (to run it as postgres)")
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres OS user")
    data_dir = Path(tempfile.mkdtemp(prefix="relay-pg-"))
    os.chown(data_dir, user.pw_uid, user.pw_gid)
    cluster = PrivatePostgres(data_dir / "data", free_port(), bin_dir)
    try:
        os.mkdir(cluster.data_dir, 0o700)
        os.chown(cluster.data_dir, user.pw_uid, user.pw_gid)
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(bin_dir / "initdb"),
                "-D",
                str(cluster.data_dir),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        cluster.start()
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(bin_dir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(cluster.port),
                "relay",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield cluster
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            cluster.stop("immediate")
        shutil.rmtree(data_dir, ignore_errors=True)
