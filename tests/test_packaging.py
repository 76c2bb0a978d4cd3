"""The built wheel: it ships every module and the migrations, and runs outside the checkout.

The wheel is built once per session the way `.ci/check-wheel` builds it (through the sdist) and
installed into a new virtualenv under tmp; `relay` then runs from an empty directory with a
clean environment, so nothing of the checkout can be imported by accident. Skipped only when
the `build` package is missing (an install without the dev extras): CI installs it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from relay import migrate
from tests.helpers import sync_count

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("build") is None,
        reason="the `build` package is missing (pip install -e '.[dev]')",
    ),
    pytest.mark.timeout(300),  # the first test builds and installs the wheel
]


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)


def _run(
    args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `args` to completion; fail the test with its output unless it exits 0."""
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel built from this checkout and installed into a new virtualenv outside it."""
    base = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "build", "--outdir", str(base / "dist"), str(ROOT)])
    (wheel,) = (base / "dist").glob("*.whl")
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)])
    return Installed(wheel, venv)


def _clean_env(**variables: str) -> dict[str, str]:
    """The environment without the caller's RELAY_* or anything pointing at the checkout."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_") and k not in dropped}
    env.update(variables)
    return env


def test_the_wheel_ships_every_module_and_the_migrations(installed: Installed) -> None:
    """The wheel holds each relay/*.py of the checkout, the dashboard's templates and the
    migrations as relay.migrations."""
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
    versions = [p.name for p in (ROOT / "migrations" / "versions").glob("*.py")]
    shipped_migrations = {
        "relay/migrations/env.py",
        "relay/migrations/script.py.mako",
        *(f"relay/migrations/versions/{name}" for name in versions),
    }
    assert "relay/migrations/versions/0001_initial_schema.py" in shipped_migrations
    assert shipped_migrations <= names
    # The dashboard's templates are package data: listed in pyproject, or left out.
    templates = {p.relative_to(ROOT).as_posix() for p in (ROOT / "relay" / "templates").glob("*")}
    assert "relay/templates/dashboard.html" in templates
    assert templates <= names, sorted(templates - names)
    # A subpackage missing from pyproject's explicit `packages` list would be left out.
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "relay").rglob("*.py")}
    assert modules <= names, sorted(modules - names)


def test_relay_migrate_from_the_wheel_in_an_empty_directory(
    installed: Installed, tmp_path: Path
) -> None:
    """`relay migrate` of the installed wheel, run in an empty directory, brings a new SQLite
    file to head with the migrations from inside the installed package."""
    workdir = tmp_path / "empty"
    workdir.mkdir()
    db_path = workdir / "fresh.db"
    url = f"sqlite+aiosqlite:///{db_path}"
    env = _clean_env(RELAY_DATABASE_URL=url)

    show_dir = "from relay import migrate; print(migrate.migrations_dir())"
    where = _run([installed.bin("python"), "-c", show_dir], cwd=workdir, env=env)
    assert Path(where.stdout.strip()).is_relative_to(installed.venv), where.stdout

    done = _run([installed.bin("relay"), "migrate"], cwd=workdir, env=env)
    assert "latest schema" in done.stdout
    head = ScriptDirectory.from_config(migrate.alembic_config("sqlite://")).get_current_head()
    at_head = f"SELECT count(*) FROM alembic_version WHERE version_num = '{head}'"
    assert sync_count(url, at_head) == 1
    assert sync_count(url, "SELECT count(*) FROM sqlite_master WHERE name = 'subscriptions'") == 1
