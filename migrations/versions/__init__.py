"""Migration scripts, one per revision (Alembic reads them; nothing imports them)."""
