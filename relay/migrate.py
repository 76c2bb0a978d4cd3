"""Apply the Alembic migrations in `migrations/` to a database, from code (`relay migrate`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from relay.errors import StartupError

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(database_url: str) -> Config:
    """An Alembic config pointing at the repository's migrations and the given database."""
    ini = ROOT / "alembic.ini"
    if not (ROOT / "migrations" / "env.py").exists():
        raise StartupError(f"migrations not found under {ROOT}; install relay from its source tree")
    config = Config(str(ini))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database to `revision` (blocking: call it before the event loop starts)."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)
