"""Timestamps through the database, on both: UTCDateTime's own SQLite text is SQLAlchemy's
DATETIME text to the character (rows written before and after it compare and sort alike),
and what goes in comes back as the same aware UTC instant, through a real table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select
from sqlalchemy.dialects import sqlite
from sqlalchemy.types import DateTime

from relay.models import UTCDateTime, api_keys
from tests.helpers import new_key, open_test_database

INSTANTS = [
    datetime(2026, 12, 7, 23, 15, 6, 123456, tzinfo=UTC),
    datetime(2026, 12, 7, 23, 15, 6, tzinfo=UTC),  # no microseconds: still six digits
    datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
    datetime(2026, 12, 8, 1, 15, 6, 7, tzinfo=timezone(timedelta(hours=2))),  # not UTC
]


@pytest.mark.parametrize("instant", INSTANTS)
def test_the_sqlite_text_is_sqlalchemys_to_the_character(instant: datetime) -> None:
    dialect = sqlite.dialect()
    # As a compiled statement gets them: each type adapted to the dialect first.
    ours = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    theirs = DateTime().dialect_impl(dialect).bind_processor(dialect)
    assert ours is not None and theirs is not None
    assert ours(instant) == theirs(instant.astimezone(UTC).replace(tzinfo=None))


def test_a_naive_time_is_refused() -> None:
    dialect = sqlite.dialect()
    process = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    assert process is not None
    with pytest.raises(ValueError, match="naive"):
        process(datetime(2026, 12, 7, 23, 15, 6))


async def test_instants_come_back_the_same_through_a_table(db_url: str) -> None:
    key = await new_key(db_url, "times")
    db = open_test_database(db_url)
    try:
        for instant in INSTANTS:
            async with db.transaction() as conn:
                await conn.execute(
                    api_keys.update()
                    .where(api_keys.c.id == key.id)
                    .values(previous_secret_until=instant)
                )
            async with db.reader() as conn:
                back = (
                    await conn.execute(
                        select(api_keys.c.previous_secret_until).where(
                            api_keys.c.id == key.id,
                            api_keys.c.previous_secret_until == instant,
                        )
                    )
                ).scalar_one()
            assert back == instant and back.tzinfo == UTC
    finally:
        await db.dispose()
