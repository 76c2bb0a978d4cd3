"""Alembic migrations, shipped inside the installed package as `relay.migrations`."""
