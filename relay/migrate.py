"""Apply the Alembic migrations to a database, from code (`relay migrate`).

The migrations are one directory with two names: `migrations/` at the top of a checkout (what
alembic.ini and the Alembic command line use) and `relay.migrations` in an installed package
(pyproject.toml maps the one onto the other). This module finds them either way and builds the
Alembic config in code, so an installed relay needs no alembic.ini and runs from any directory.
It owns no schema: the revisions and env.py do.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import command
from alembic.config import Config

from relay.errors import StartupError

# A plain checkout on sys.path (pytest's `pythonpath = ["."]`, no install) has no
# relay.migrations package: its migrations are the directory beside the package.
CHECKOUT_MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def migrations_dir() -> Path:
    """The directory holding env.py and versions/: the installed package's, else the checkout's."""
    spec = importlib.util.find_spec("relay.migrations")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for candidate in [*map(Path, locations), CHECKOUT_MIGRATIONS]:
        if (candidate / "env.py").is_file():
            return candidate
    raise StartupError(
        f"migrations not found (no relay.migrations package, nothing in {CHECKOUT_MIGRATIONS}); "
        "reinstall relay"
    )


def alembic_config(database_url: str, secret_key: str | None = None) -> Config:
    """An Alembic config pointing at relay's migrations and the given database; `secret_key`
    (RELAY_SECRET_KEY) for the migrations that seal or open signing secrets."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["database_url"] = database_url
    if secret_key is not None:
        config.attributes["secret_key"] = secret_key
    return config


def upgrade(database_url: str, revision: str = "head", *, secret_key: str | None = None) -> None:
    """Bring the database to `revision` (blocking: call it before the event loop starts)."""
    command.upgrade(alembic_config(database_url, secret_key), revision)


def downgrade(database_url: str, revision: str = "base", *, secret_key: str | None = None) -> None:
    command.downgrade(alembic_config(database_url, secret_key), revision)
