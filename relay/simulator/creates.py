"""The upstream's create surface: POST /v1/generation/{provider}/{model...} (answered with the
result object) and POST /v1/generation/sse/{provider}/{model...} (answered with a stream, see
`sse`), and the log of every create that arrived.

Bodies are read chunk by chunk: each create records its byte count and sha256 so tests can
check what arrived byte-exact, and only a JSON body is kept whole (to parse the input); a
multipart upload of 50 MiB is never held. Creates get latency (`latency_s` +
`create_latency_s`) and the auth check, then the create switches of FaultSettings
(`create_refusal`, `create_without_id`, and `create_answer_delay_s`: made, then answered
late); the random poll faults stay on GETs. It must not
script lifecycles (FakeUpstream draws them from the model's family) nor answer polls.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from relay.simulator.answers import (
    INVALID_BODY,
    SERVER_ERRORS,
    Answer,
    as_response,
    error_answer,
    rate_limited,
)
from relay.simulator.config import FaultSettings
from relay.simulator.families import family_for_model
from relay.simulator.model import QUEUED, Generation
from relay.simulator.sse import sse_frames

if TYPE_CHECKING:
    from relay.simulator.state import FakeUpstream

# Larger than relay's default proxy limit (100 MiB), so relay's own limit is what tests meet.
MAX_CREATE_BYTES: Final = 256 * 1024 * 1024
_REFUSALS: Final[dict[int, Answer]] = {
    402: error_answer(
        402, "insufficient_credits", "INSUFFICIENT_CREDITS", "Not enough credits for this task."
    ),
    422: error_answer(
        422, "content_rejected", "CONTENT_REJECTED", "The input was rejected by the content policy."
    ),
    500: SERVER_ERRORS[0],
}


@dataclass(slots=True)
class CreateRecord:
    """One create request that passed the auth check, as it arrived."""

    id: str | None  # the generation made, None when refused
    path: str
    content_type: str
    bytes: int
    sha256: str
    at: float  # unix time the body was read
    sse: bool
    status: int  # what it was answered
    header_names: list[str]  # lower case, sorted: what the client forwarded

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _refusal(faults: FaultSettings) -> Answer | None:
    if faults.create_refusal is None:
        return None
    if faults.create_refusal == 429:
        return rate_limited(faults.retry_after_s)
    return _REFUSALS[faults.create_refusal]


async def _read_body(request: Request, *, keep: bool) -> tuple[int, str, bytes]:
    """(byte count, sha256 hex, the body if `keep` else b""), read chunk by chunk."""
    digest = hashlib.sha256()
    size = 0
    kept = bytearray()
    async for chunk in request.stream():
        digest.update(chunk)
        size += len(chunk)
        if keep:
            kept += chunk
    return size, digest.hexdigest(), bytes(kept)


def _parse_input(raw: bytes) -> dict[str, Any] | None:
    """The JSON object of a create body ({} when blank); None when it is not one."""
    try:
        parsed: object = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _first_body(gen: Generation, without_id: bool) -> bytes:
    if not without_id:
        return gen.answer(QUEUED)[2]
    body = gen.body(QUEUED)
    del body["id"]
    return orjson.dumps(body)


def create_routes(sim: FakeUpstream) -> list[Route]:
    """The upstream's create routes, bound to `sim`."""

    async def create(request: Request, *, sse: bool) -> Response:
        faults = sim.faults
        delay_s = faults.latency_s + faults.create_latency_s
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        failure = sim.bearer.failure(request.scope["headers"], faults.auth_mode)
        if failure is not None:
            return as_response(failure)
        content_type = request.headers.get("content-type", "")
        multipart = content_type.lower().startswith("multipart/")
        size, sha256, raw = await _read_body(request, keep=not multipart)
        names = sorted({name.decode("latin-1").lower() for name, _ in request.scope["headers"]})
        record = CreateRecord(
            None, request.url.path, content_type, size, sha256, time.time(), sse, 200, names
        )
        sim.creates.append(record)
        refused = _refusal(faults)
        parsed = None if multipart else _parse_input(raw)
        if refused is None and parsed is None and not multipart:
            refused = INVALID_BODY
        if refused is not None:
            record.status = refused[0]
            return as_response(refused)
        model = f"{request.path_params['provider']}/{request.path_params['model']}"
        spec = {"family": family_for_model(model), "input": parsed or None}
        gen = sim.create_checked([spec], model=model)[0]
        record.id = gen.id
        if faults.create_answer_delay_s > 0:
            await asyncio.sleep(faults.create_answer_delay_s)
        if sse:
            frames = sse_frames(sim, gen, faults, _first_body(gen, faults.create_without_id))
            return StreamingResponse(frames, media_type="text/event-stream")
        return Response(_first_body(gen, faults.create_without_id), media_type="application/json")

    async def plain(request: Request) -> Response:
        return await create(request, sse=False)

    async def streamed(request: Request) -> Response:
        return await create(request, sse=True)

    return [
        # Before the plain route, which would take "sse" for a provider.
        Route(
            "/v1/generation/sse/{provider}/{model:path}",
            streamed,
            methods=["POST"],
            max_body_size=MAX_CREATE_BYTES,
        ),
        Route(
            "/v1/generation/{provider}/{model:path}",
            plain,
            methods=["POST"],
            max_body_size=MAX_CREATE_BYTES,
        ),
    ]
