"""A callback receiver run as its own process, for the scale-out tests (thousands of callbacks
from several relay nodes: it must not share the test's interpreter).

    python -m tests.callback_sink --port 8700      (from the checkout's root)

Every POST is recorded as [webhook-id, arrival time, SHA-256 of the body] and answered 200;
GET /_arrivals returns the records. Raw ASGI, no framework: it must not be the bottleneck.
It judges nothing: the tests count duplicates from the records.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from typing import Any

arrivals: list[tuple[str, float, str]] = []


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _answer(send: Any, body: bytes) -> None:
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["method"] == "GET" and scope["path"] == "/_arrivals":
        await _answer(send, json.dumps(arrivals).encode())
        return
    body = await _read_body(receive)
    webhook_id = dict(scope["headers"]).get(b"webhook-id", b"").decode()
    arrivals.append((webhook_id, time.time(), hashlib.sha256(body).hexdigest()))
    await _answer(send, b'{"ok":true}')


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
