"""The baseline the ingest target is set against: a bare Starlette handler doing one insert
per request, run in the same benchmark as the relay so the comparison holds on a noisy machine.

    python -m bench.bare_ingest --port 8800 --database-url sqlite+aiosqlite:///bare.db

It parses the JSON body and inserts one row through SQLAlchemy async, nothing else: no API
key, no validation, no private-address rule, no idempotency, no batching. Under uvicorn with
uvloop and httptools, like the relay.
"""

from __future__ import annotations

import argparse
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import uvicorn
from sqlalchemy import Column, DateTime, MetaData, String, Table, Text, event, insert
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

metadata = MetaData()
rows = Table(
    "bare_subscriptions",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("generation_id", String(128), nullable=False),
    Column("callback_url", Text, nullable=False),
    Column("metadata", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


def make_app(database_url: str) -> Starlette:
    engine: AsyncEngine = create_async_engine(database_url, pool_size=10, max_overflow=10)
    if database_url.startswith("sqlite"):

        @event.listens_for(engine.sync_engine, "connect")
        def _wal(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

    async def create(request: Request) -> Response:
        body = orjson.loads(await request.body())
        row = {
            "id": uuid.uuid4().hex,
            "generation_id": body["generation_id"],
            "callback_url": body["callback_url"],
            "metadata": orjson.dumps(body.get("metadata")).decode(),
            "created_at": datetime.now(UTC),
        }
        async with engine.begin() as conn:
            await conn.execute(insert(rows).values(row))
        return Response(orjson.dumps({"id": row["id"]}), 201, media_type="application/json")

    async def healthz(_request: Request) -> Response:
        return Response(b"ok")

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        yield
        await engine.dispose()

    return Starlette(
        routes=[
            Route("/v1/subscriptions", create, methods=["POST"]),
            Route("/healthz", healthz),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", required=True)
    args = parser.parse_args()
    uvicorn.run(
        make_app(args.database_url),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
