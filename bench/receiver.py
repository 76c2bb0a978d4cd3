"""A fast callback receiver for the benchmarks, run as its own process.

    python -m bench.receiver --port 8700

POST to any path records (webhook-id, relay-subscription-id, arrival time) and answers 200;
paths under /hang/ sleep until the client gives up (a receiver that hangs). GET /_stats
gives counts and the webhook-ids seen more than once; GET /_arrivals gives every arrival;
POST /_reset forgets everything. Raw ASGI, no framework: it must not be the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from typing import Any

import orjson

Scope = dict[str, Any]

arrivals: list[tuple[str, str, float, str]] = []
seen: Counter[str] = Counter()
bodies: dict[str, bytes] = {}
different_bodies: set[str] = set()


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send(send: Any, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path: str = scope["path"]
    if scope["method"] == "GET" and path == "/_stats":
        duplicates = sorted(k for k, v in seen.items() if v > 1)
        stats = {
            "total": len(arrivals),
            "unique": len(seen),
            "duplicates": duplicates,
            "duplicates_with_other_body": sorted(different_bodies),
        }
        await _send(send, 200, orjson.dumps(stats))
        return
    if scope["method"] == "GET" and path == "/_arrivals":
        await _send(send, 200, orjson.dumps(arrivals))
        return
    if scope["method"] == "POST" and path == "/_reset":
        arrivals.clear()
        seen.clear()
        bodies.clear()
        different_bodies.clear()
        await _send(send, 200, b"{}")
        return
    body = await _read_body(receive)
    now = time.time()
    headers = dict(scope["headers"])
    if path.startswith("/hang/"):
        await asyncio.sleep(3600)
        return
    webhook_id = headers.get(b"webhook-id", b"").decode()
    sub_id = headers.get(b"relay-subscription-id", b"").decode()
    arrivals.append((webhook_id, sub_id, now, path))
    seen[webhook_id] += 1
    previous = bodies.setdefault(webhook_id, body)
    if previous != body:
        different_bodies.add(webhook_id)
    await _send(send, 200, b'{"ok":true}')


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
