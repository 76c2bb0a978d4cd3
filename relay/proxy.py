"""Creating generations through the relay: POST /v1/generation/{provider}/{model...}.

One call creates the generation upstream and subscribes to it. Everything that can be
checked is checked first (proxy_request.py), so a refused request costs no credits; the body
is then streamed to the upstream (creator.py) and the client gets the upstream's status and
body verbatim. When the upstream accepted (2xx with an `id`), the subscription is committed
before the answer is sent and named in Relay-Subscription-Id; refusals pass through with no
subscription. No answer from the upstream is 502 `upstream_unavailable` or 504
`upstream_timeout`; a 2xx without an id is 502 `upstream_invalid_answer`.

With an Idempotency-Key the request first claims the key (idempotency.py). The holder's
answer is stored in the same transaction as the subscription, so a retry finds both or
neither. Every other request with the key waits for the holder and gets its answer again
(`Idempotent-Replayed: true`), or 422 `idempotency_mismatch` if it differs from the first;
409 `idempotency_in_progress` when the holder is still at work after the wait, and 409
`idempotency_outcome_unknown` when the holder died before recording an answer: the upstream
may have created the generation, and the relay never creates again under that key.

No SQL here (the store does it) and nothing of the worker's side: the routes only wake it
through the hooks in `ApiContext`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from relay import store
from relay.api import ApiContext
from relay.creator import CreateAnswer, CreateFailed, Creator, OpenStream, Upload
from relay.http import Answer, ApiError, Endpoint, Operation, error_response, route
from relay.idempotency import IdempotencyGate, Verdict, differs, rule
from relay.models import IdempotencyState
from relay.proxy_request import FORWARDED_MEDIA_TYPES, ClientGone, CreateJob, checked_request
from relay.schemas import ProxyHeaders, ProxyPath

logger = logging.getLogger(__name__)


@dataclass
class ProxyContext:
    """What the create route needs, built in the app's lifespan. With RELAY_UPSTREAM_SSE the
    creator is the streaming one (ssecreate.py), `follow` takes the open streams (streams.py,
    wired by app.py: this side never imports the worker's) and `stream_owner` names their
    follower on the generations' leases."""

    api: ApiContext
    creator: Creator
    gate: IdempotencyGate
    follow: Callable[[str, OpenStream], None] | None = None
    stream_owner: str | None = None


@dataclass
class Forwarded:
    """How a forwarded create ended: the answer (None: the client left mid-body), whether the
    upstream may have created something (DONE) or certainly did not (RELEASED), whether the
    answer is already committed, and headers only this answer carries."""

    answer: store.StoredAnswer | None
    state: IdempotencyState
    committed: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def _failpoint(ctx: ProxyContext, name: str) -> None:
    """The test seam RELAY_FAILPOINT: die here, as a crash or a power cut would."""
    if ctx.api.settings.failpoint == name:
        logger.critical("failpoint %s: killing this process", name)
        os.kill(os.getpid(), signal.SIGKILL)


# --- Answers --------------------------------------------------------------------------------


def _stored(exc: ApiError) -> store.StoredAnswer:
    """The relay's own error answer, as it is sent and stored."""
    sent = error_response(exc)
    headers = {"content-type": "application/json", **(exc.headers or {})}
    return store.StoredAnswer(exc.status, headers, bytes(sent.body))


def _passed_through(answer: CreateAnswer) -> store.StoredAnswer:
    headers: dict[str, str] = {}
    if answer.content_type is not None:
        headers["content-type"] = answer.content_type
    if answer.retry_after is not None:
        headers["retry-after"] = answer.retry_after
    return store.StoredAnswer(answer.status, headers, answer.body, None, answer.generation_id)


def _response(answer: store.StoredAnswer, extra: Mapping[str, str]) -> Response:
    headers = {**answer.headers, **extra}
    if answer.subscription_id is not None:
        headers["relay-subscription-id"] = answer.subscription_id
    return Response(answer.body, status_code=answer.status, headers=headers)


def _upstream_error(exc: CreateFailed) -> ApiError:
    maybe = (
        "; the generation may have been created upstream, and no subscription was made"
        if exc.sent
        else "; nothing was created and no subscription was made"
    )
    if exc.kind == "timeout":
        return ApiError(504, "upstream_timeout", exc.detail + maybe)
    if exc.kind == "invalid":
        return ApiError(502, "upstream_invalid_answer", exc.detail + maybe)
    return ApiError(502, "upstream_unavailable", exc.detail + maybe)


def _after_refusal(status: int) -> IdempotencyState:
    """Whether an upstream's non-2xx answer proves nothing was created. A 4xx refused the
    request, a 503 was too busy to take it; any other 5xx (a gateway's 502 or 504 above all)
    may come after the upstream created the generation, so it is never created again."""
    if 300 <= status < 500 or status == 503:
        return IdempotencyState.RELEASED
    return IdempotencyState.DONE


def _lost_generation(job: CreateJob, why: str) -> None:
    logger.error(
        "create through the relay for key %s (%s): %s; a generation may exist upstream that "
        "nobody is subscribed to",
        job.key_id,
        job.model_path,
        why,
    )


# --- Forwarding -----------------------------------------------------------------------------


async def _forward(
    ctx: ProxyContext, job: CreateJob, ref: store.IdempotencyRef | None
) -> Forwarded:
    """Create upstream and, when it accepted, commit the subscription (and settle `ref`)."""
    started = time.monotonic()
    try:
        upload = Upload(job.model_path, job.body.chunks(), job.content_type, job.declared_length)
        answer = await ctx.creator.create(upload)
    except ClientGone:
        logger.info("create through the relay abandoned: the client left mid-body")
        return Forwarded(None, IdempotencyState.RELEASED)
    except ApiError as exc:  # the body's own: past the size limit, the upload cut off
        return Forwarded(_stored(exc), IdempotencyState.RELEASED)
    except CreateFailed as exc:
        if exc.sent:
            _lost_generation(job, f"{exc.detail} after the request went out")
        state = IdempotencyState.DONE if exc.sent else IdempotencyState.RELEASED
        return Forwarded(_stored(_upstream_error(exc)), state)
    answered = time.monotonic()
    try:
        return await _accepted(ctx, job, ref, answer, started, answered)
    except BaseException:
        # Only the last step of _accepted hands the stream on: nothing raises after it.
        if answer.stream is not None:
            answer.stream.close()
        raise


async def _accepted(
    ctx: ProxyContext,
    job: CreateJob,
    ref: store.IdempotencyRef | None,
    answer: CreateAnswer,
    started: float,
    answered: float,
) -> Forwarded:
    """The upstream answered: pass a refusal on, or commit the subscription of what it made
    (and hand its stream on to be followed)."""
    passed = _passed_through(answer)
    if not answer.accepted:
        return Forwarded(passed, _after_refusal(answer.status))
    if answer.generation_id is None:
        _lost_generation(job, f"the upstream answered {answer.status} without a generation id")
        invalid = ApiError(
            502,
            "upstream_invalid_answer",
            f"the upstream answered {answer.status} without a generation id; the generation "
            "may have been created upstream, and no subscription was made",
        )
        return Forwarded(_stored(invalid), IdempotencyState.DONE)
    _failpoint(ctx, "proxy.before_commit")
    settlement = None
    if ref is not None:
        settlement = store.Settlement(ref, IdempotencyState.DONE, job.body.sha256(), passed)
    outcome = await store.record_proxied_create(
        ctx.api.db,
        store.ProxiedCreate(
            key_hash=job.key_hash,
            generation_id=answer.generation_id,
            callback_url=job.callback_url,
            metadata_json=job.metadata_json,
            generation_status=answer.generation_status,
            settlement=settlement,
            stream_owner=ctx.stream_owner if answer.stream is not None else None,
            stream_lease_s=ctx.api.settings.lease_s,
            first_poll=ctx.api.first_poll(),
        ),
    )
    committed = time.monotonic()
    _failpoint(ctx, "proxy.after_commit")
    if outcome.polls_queued:
        ctx.api.on_polls_queued()
    if outcome.deliveries_queued:
        ctx.api.on_deliveries_queued()
    if ref is not None and not outcome.settled:
        logger.warning(
            "Idempotency-Key of key %s was lost before its answer was stored", ref.key_id
        )
    if outcome.subscription is None:
        logger.warning(
            "key %s was revoked while its create went through; generation %s is not subscribed",
            job.key_id,
            answer.generation_id,
        )
    else:
        passed = replace(passed, subscription_id=outcome.subscription["id"])
    # The commit is the window in which a crash loses the subscription (README).
    timing = (
        f"upstream;dur={(answered - started) * 1000:.1f}, "
        f"commit;dur={(committed - answered) * 1000:.1f}"
    )
    if answer.stream is not None:
        if outcome.subscription is not None and ctx.follow is not None:
            ctx.follow(answer.generation_id, answer.stream)
        else:
            answer.stream.close()
    return Forwarded(passed, IdempotencyState.DONE, True, {"server-timing": timing})


# --- Idempotency-Key ------------------------------------------------------------------------


def _mismatch(what: str) -> ApiError:
    return ApiError(
        422,
        "idempotency_mismatch",
        f"this Idempotency-Key was first used for another request (its {what} differs); "
        "use a new key for a new request",
    )


async def _duplicate(
    ctx: ProxyContext, job: CreateJob, ref: store.IdempotencyRef, found: store.IdempotencyRecord
) -> Response:
    """A request whose key another holds: wait for it, then replay its answer."""
    what = differs(found.fingerprint, job.fingerprint)
    if what is not None:
        raise _mismatch(what)
    body_sha256 = await job.body.read_through()
    ruling = rule(await ctx.gate.wait(ref, found), job.fingerprint, body_sha256)
    if ruling.verdict == Verdict.REPLAY:
        assert ruling.answer is not None
        return _response(ruling.answer, {"idempotent-replayed": "true"})
    if ruling.verdict == Verdict.MISMATCH:
        raise _mismatch(ruling.differs or "request")
    if ruling.verdict == Verdict.OUTCOME_UNKNOWN:
        logger.error(
            "Idempotency-Key of key %s: the request holding it ended without recording an "
            "answer (its process died, or lost the database); its create may have reached "
            "the upstream, so the relay will not create again under this key",
            job.key_id,
        )
        raise ApiError(
            409,
            "idempotency_outcome_unknown",
            "the first request with this Idempotency-Key was interrupted before its answer "
            "was recorded: the generation may have been created upstream, without a "
            "subscription; the relay will not create it again under this key (use a new key "
            "to create another)",
        )
    raise ApiError(
        409,
        "idempotency_in_progress",
        "another request with this Idempotency-Key is in progress, or ended without creating "
        "anything; retry after Retry-After",
        headers={"retry-after": "1"},
    )


# --- The route ------------------------------------------------------------------------------


async def _create(ctx: ProxyContext, scope: Scope, receive: Receive) -> Response | None:
    job = await checked_request(ctx.api, scope, receive)
    if job.idempotency_key is None:
        forwarded = await _forward(ctx, job, None)
    else:
        ref = ctx.gate.ref(job.key_id, job.idempotency_key)
        found = await ctx.gate.claim(ref, job.fingerprint)
        if found is not None:
            try:
                return await _duplicate(ctx, job, ref, found)
            except ClientGone:
                return None
        async with ctx.gate.holding(ref):
            # Not settled on an exception (the database failed at the commit): the key
            # stays in progress, its lease runs out, and retries learn the outcome is unknown.
            forwarded = await _forward(ctx, job, ref)
            if not forwarded.committed:
                settlement = store.Settlement(
                    ref, forwarded.state, job.body.sha256(), forwarded.answer
                )
                await store.settle_idempotency_key(ctx.api.db, settlement)
    if forwarded.answer is None:
        return None
    return _response(forwarded.answer, forwarded.extra)


class CreateThroughRelay:
    """POST /v1/generation/{provider}/{model...} as a bare ASGI app: the body streams from
    `receive` to the upstream, and a client that left is told apart from one that finished."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx: ProxyContext = scope["state"]["proxy"]
        response = await _create(ctx, scope, receive)
        if response is not None:
            await response(scope, receive, send)


CREATE = Operation(
    "createGeneration",
    "Create a generation upstream and subscribe to it, in one call",
    path=ProxyPath,
    headers=ProxyHeaders,
    raw_body=FORWARDED_MEDIA_TYPES,
    answers={
        200: Answer(
            "the upstream accepted: its answer, verbatim (status and body); the generation "
            "is subscribed to",
            headers={
                "Relay-Subscription-Id": "the subscription made for the generation",
                "Idempotent-Replayed": "`true` on the first answer sent again for a retry",
            },
        )
    },
    errors=(401, 404, 409, 413, 415, 422, 429, 502, 504),
    error_notes={
        409: "idempotency_in_progress (retry after Retry-After) or idempotency_outcome_unknown "
        "(the first request with the key was interrupted: never created again under it)",
        422: "validation_error (`details` names the header), or idempotency_mismatch",
    },
    passthrough=Answer("the upstream refused: its answer, verbatim; no subscription is made"),
)

ROUTES = [
    route("/v1/generation/{provider}/{model:path}", POST=Endpoint(CREATE, CreateThroughRelay()))
]
