"""The upstream simulator: an in-memory stand-in for skills.video's generation API.

Owns everything `relay fake-upstream`, the tests and the benchmarks need from a fake upstream:

- scripted lifecycles: each generation moves IN_QUEUE -> IN_PROGRESS -> COMPLETED, FAILED or
  CANCELED on its own schedule, drawn per model family (speech seconds, images tens of seconds,
  video minutes) from a seeded RNG and multiplied by `time_scale`, or given explicitly;
- result bodies shaped like upstream's (`id, status, input, data, usage`, `code`/`message` only
  when FAILED, an unknown `provider_meta` field on final bodies), optionally in the legacy
  lower-case vocabulary;
- faults: 5xx, 429 with or without `Retry-After`, latency, hangs, malformed bodies, 401/403 and
  unknown or not-yet-visible ids, globally or per generation;
- counters: every poll of every id (known or not) with its wall-clock time, readable under
  `/_fake/` so tests can count what relay did.

It must not import other relay modules, touch a database, or read the environment other than
through `FakeUpstreamConfig.from_env(environ)`. State lives in one process and is not
thread-safe: mutate it from the event loop that serves it (or over HTTP).

Polls are the hot path (benchmarks send thousands per second): a small ASGI middleware answers
them ahead of Starlette's router, with bodies serialised once per lifecycle phase.

HTTP surface (see `FakeUpstream` for the JSON shapes):

    GET  /v1/generation/{id}                    poll (bearer checked, faults applied)
    POST /v1/generation/{provider}/{model...}   create from a model path (bearer checked)
    POST /_fake/generations                     create a scripted generation
    POST /_fake/generations/bulk                create many
    POST /_fake/generations/{id}/finish         make it final now
    GET  /_fake/generations/{id}/polls          poll count and times of one id
    GET  /_fake/stats                           totals
    POST /_fake/reset                           clear counters (optionally generations, faults)
    GET  /_fake/faults, PUT /_fake/faults       global fault settings
"""

from __future__ import annotations

import array
import asyncio
import dataclasses
import functools
import math
import random
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import quote

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

Family = Literal["video", "image", "speech"]
FinalStatus = Literal["COMPLETED", "FAILED", "CANCELED"]
AuthMode = Literal["ok", "401", "403"]

STATUSES: Final = ("IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELED")
FINAL_STATUSES: Final[tuple[FinalStatus, ...]] = ("COMPLETED", "FAILED", "CANCELED")
FAMILIES: Final[tuple[Family, ...]] = ("video", "image", "speech")
LEGACY_STATUS: Final[Mapping[str, str]] = {
    "IN_QUEUE": "starting",
    "IN_PROGRESS": "processing",
    "COMPLETED": "succeeded",
    "FAILED": "failed",
    "CANCELED": "canceled",
}

# (queue range, run range) in seconds before time_scale, per family; the totals match the
# ranges upstream.md gives: speech 3-11 s, images 5-30 s, video 60-300 s.
FAMILY_DURATIONS_S: Final[Mapping[Family, tuple[tuple[float, float], tuple[float, float]]]] = {
    "speech": ((0.0, 1.0), (3.0, 10.0)),
    "image": ((0.0, 2.0), (5.0, 28.0)),
    "video": ((0.0, 10.0), (60.0, 290.0)),
}
_VIDEO_WORDS: Final = frozenset(
    [
        "sora",
        "veo",
        "kling",
        "video",
        "seedance",
        "runway",
        "wan",
        "luma",
        "vidu",
        "hailuo",
        "ltx",
        "pixverse",
        "lipsync",
        "upscale",
        "pika",
        "hunyuan",
    ]
)
_SPEECH_WORDS: Final = frozenset(["speech", "tts", "audio", "voice", "elevenlabs", "eleven"])
_CODE_PREFIX: Final[Mapping[Family, str]] = {"video": "VIDEO", "image": "IMAGE", "speech": "TTS"}
_FAILURES: Final = (
    ("FAILED", "The generation failed."),
    ("TIMEOUT", "The generation timed out."),
    ("PROVIDER_UNAVAILABLE", "The model provider is unavailable."),
    ("CONTENT_REJECTED", "The input was rejected by the content policy."),
)
_CREDITS: Final[Mapping[Family, int]] = {"video": 200, "image": 20, "speech": 5}
# Shared by every generation created without an input: never mutated.
_DEFAULT_INPUT: Final[Mapping[Family, dict[str, Any]]] = {
    "video": {"prompt": "a cat surfing a wave", "duration": 5, "aspect_ratio": "16:9"},
    "image": {"prompt": "a cat", "aspect_ratio": "1:1", "resolution": "1024x1024", "n": 1},
    "speech": {"text": "Hello from the simulator.", "voice": "default"},
}
_SPEC_KEYS: Final = frozenset(
    [
        "id",
        "family",
        "queue_s",
        "run_s",
        "final_at_s",
        "final_status",
        "legacy_status",
        "not_found_for_s",
        "faults",
        "input",
        "code",
        "message",
    ]
)
_RATE_KEYS: Final = ("hang_rate", "error_rate", "rate_limit_rate", "malformed_rate")
_MAX_BODY_BYTES: Final = 64 * 1024 * 1024  # bulk creation of 100,000 items fits
_SIMULATOR: Final = "relay.fakeupstream"
POLL_PREFIX: Final = "/v1/generation/"


class InvalidSpec(ValueError):
    """A generation spec or fault setting is not acceptable (HTTP 400 on the control API)."""


class Conflict(InvalidSpec):
    """The request contradicts the current state (HTTP 409 on the control API)."""


class DuplicateId(Conflict):
    """A generation with this id exists already."""


class AlreadyFinal(Conflict):
    """finish() with another status than the one the generation already ended with."""


class UnknownGeneration(KeyError):
    """No generation has this id (HTTP 404 on the control API)."""


# ---------------------------------------------------------------------------------------------
# Configuration


def _check_number(
    name: str, value: object, *, minimum: float = 0.0, maximum: float = math.inf
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSpec(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or not minimum <= number <= maximum:
        upper = "" if maximum == math.inf else f" and <= {maximum:g}"
        raise InvalidSpec(f"{name} must be finite, >= {minimum:g}{upper}, got {value!r}")
    return number


@dataclass(slots=True)
class FaultSettings:
    """Faults applied to polls; rates are fractions of polls, drawn from the seeded RNG.

    One uniform draw per poll picks at most one of hang, error, rate limit, malformed, in that
    order of thresholds. Latency is added to every poll, before the auth check.
    """

    error_rate: float = 0.0  # answered 500, 502 (an HTML body, as proxies send) or 503
    rate_limit_rate: float = 0.0  # answered 429
    retry_after_s: float | None = 1.0  # Retry-After sent with 429; None sends no header
    latency_s: float = 0.0  # added to every poll
    hang_rate: float = 0.0  # held for hang_s (or until the client goes), then answered normally
    hang_s: float = 3600.0
    malformed_rate: float = 0.0  # answered 200 with invalid JSON or a JSON non-object
    auth_mode: AuthMode = "ok"  # "401"/"403": every upstream request gets that answer

    @staticmethod
    def validate_changes(changes: object) -> dict[str, Any]:
        """Check a partial fault mapping (JSON); return it with numbers as floats."""
        if not isinstance(changes, Mapping):
            raise InvalidSpec("faults must be a JSON object")
        known = {f.name for f in dataclasses.fields(FaultSettings)}
        checked: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in known:
                raise InvalidSpec(f"unknown fault setting {key!r}; known: {sorted(known)}")
            if key == "auth_mode":
                if value not in ("ok", "401", "403"):
                    raise InvalidSpec(f'auth_mode must be "ok", "401" or "403", got {value!r}')
                checked[key] = value
            elif key == "retry_after_s":
                checked[key] = None if value is None else _check_number(key, value)
            elif key.endswith("_rate"):
                checked[key] = _check_number(key, value, maximum=1.0)
            else:
                checked[key] = _check_number(key, value)
        if sum(checked.get(key, 0.0) for key in _RATE_KEYS) > 1.0:
            raise InvalidSpec("the fault rates together must not exceed 1")
        return checked

    def merged(self, changes: Mapping[str, Any]) -> FaultSettings:
        """A copy with validated `changes` applied; the rates together must not exceed 1."""
        merged = dataclasses.replace(self, **self.validate_changes(changes))
        if merged.random_rate > 1.0 + 1e-9:
            raise InvalidSpec("the fault rates together must not exceed 1")
        return merged

    @property
    def random_rate(self) -> float:
        return self.hang_rate + self.error_rate + self.rate_limit_rate + self.malformed_rate

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class FakeUpstreamConfig:
    """How the simulator behaves at start; faults can be changed at run time over HTTP."""

    api_key: str | None = None  # None: any non-empty bearer token is accepted
    seed: int = 0
    time_scale: float = 1.0  # multiplies drawn lifecycle durations (0.01: a 60 s video takes 0.6 s)
    failed_fraction: float = 0.05  # of drawn outcomes
    canceled_fraction: float = 0.02
    faults: FaultSettings = field(default_factory=FaultSettings)

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must be None or a non-empty string")
        try:
            _check_number("time_scale", self.time_scale)
            _check_number("failed_fraction", self.failed_fraction, maximum=1.0)
            _check_number("canceled_fraction", self.canceled_fraction, maximum=1.0)
        except InvalidSpec as exc:
            raise ValueError(str(exc)) from None
        if self.failed_fraction + self.canceled_fraction > 1.0:
            raise ValueError("failed_fraction + canceled_fraction must not exceed 1")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> FakeUpstreamConfig:
        """Read RELAY_FAKE_API_KEY, RELAY_FAKE_SEED and RELAY_FAKE_TIME_SCALE (all optional).

        An empty RELAY_FAKE_API_KEY means "accept any key". Raises ValueError naming the
        variable on a bad value.
        """
        api_key = environ.get("RELAY_FAKE_API_KEY", "").strip() or None
        seed = 0
        raw_seed = environ.get("RELAY_FAKE_SEED", "").strip()
        if raw_seed:
            try:
                seed = int(raw_seed)
            except ValueError:
                raise ValueError(f"RELAY_FAKE_SEED must be an integer, got {raw_seed!r}") from None
        time_scale = 1.0
        raw_scale = environ.get("RELAY_FAKE_TIME_SCALE", "").strip()
        if raw_scale:
            try:
                time_scale = float(raw_scale)
            except ValueError:
                time_scale = math.nan
            if not math.isfinite(time_scale) or time_scale < 0:
                raise ValueError(
                    f"RELAY_FAKE_TIME_SCALE must be a finite number >= 0, got {raw_scale!r}"
                )
        return cls(api_key=api_key, seed=seed, time_scale=time_scale)


def family_for_model(model_path: str) -> Family:
    """Guess the model family from `provider/model...`: video, then speech, else image."""
    words = set(re.findall(r"[a-z]+", model_path.lower()))
    if words & _VIDEO_WORDS:
        return "video"
    if words & _SPEECH_WORDS:
        return "speech"
    return "image"


# ---------------------------------------------------------------------------------------------
# Generations and prepared answers

# (status code, headers, body): what one poll sends, built once and reused.
_Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


@functools.cache
def _header(name: bytes, value: bytes | int) -> tuple[bytes, bytes]:
    # Shared across the many cached answers, which mostly have the same few lengths.
    return name, value if isinstance(value, bytes) else str(value).encode()


def _answer(status: int, body: bytes, content_type: bytes = b"application/json") -> _Answer:
    headers = [_header(b"content-type", content_type), _header(b"content-length", len(body))]
    return status, headers, body


def _error_answer(status: int, error: str, code: str, message: str) -> _Answer:
    return _answer(status, orjson.dumps({"error": error, "code": code, "message": message}))


_UNAUTHORIZED: Final = _error_answer(
    401, "unauthorized", "UNAUTHORIZED", "Missing or invalid API key."
)
_FORBIDDEN: Final = _error_answer(403, "forbidden", "FORBIDDEN", "This API key has been revoked.")
_NOT_FOUND: Final = _error_answer(404, "not_found", "GENERATION_NOT_FOUND", "Generation not found.")
_SERVER_ERRORS: Final = (
    _error_answer(500, "internal_error", "INTERNAL_ERROR", "Internal server error."),
    _answer(
        502,
        b"<html><head><title>502 Bad Gateway</title></head>"
        b"<body><center><h1>502 Bad Gateway</h1></center></body></html>",
        b"text/html",
    ),
    _error_answer(
        503,
        "service_unavailable",
        "PROVIDER_UNAVAILABLE",
        "The service is temporarily unavailable.",
    ),
)
_RATE_LIMITED_BODY: Final = orjson.dumps(
    {"error": "rate_limited", "code": "RATE_LIMITED", "message": "Too many requests."}
)
_MALFORMED_BODIES: Final = (
    b'{"id": "gen_truncated", "status": "COMPL',
    b"",
    b"<html><body>not json</body></html>",
    b'["not", "an", "object"]',
    b"null",
    b'"COMPLETED"',
)


def _format_retry_after(seconds: float) -> bytes:
    # Whole seconds are what HTTP defines; fractions are sent as written so tests can be fast.
    return str(int(seconds)).encode() if seconds.is_integer() else repr(seconds).encode()


@dataclass(slots=True, eq=False)
class Generation:
    """One scripted generation. Times are time.monotonic() unless the name says `wall`."""

    id: str
    family: Family
    model: str
    input: dict[str, Any]
    created_mono: float
    wall_offset_s: float  # time.time() - time.monotonic() at creation
    started_mono: float  # IN_PROGRESS from here
    final_mono: float  # final_status from here
    final_status: FinalStatus
    legacy_status: bool = False
    not_found_until_mono: float = -math.inf
    fault_overrides: dict[str, Any] | None = None
    code: str | None = None  # used when FAILED
    message: str | None = None
    answers: list[_Answer | None] = field(default_factory=lambda: [None, None, None])
    faults_cache: FaultSettings | None = None
    faults_cache_version: int = -1

    def phase_at(self, now_mono: float) -> int:
        """0 while queued, 1 while running, 2 once final."""
        if now_mono >= self.final_mono:
            return 2
        return 1 if now_mono >= self.started_mono else 0

    def status_at(self, now_mono: float) -> str:
        """The canonical (upper-case) status at `now_mono`."""
        phase = self.phase_at(now_mono)
        return self.final_status if phase == 2 else STATUSES[phase]

    @property
    def final_at(self) -> float:
        """Unix time at which the generation is (or will be) final."""
        return self.final_mono + self.wall_offset_s

    @property
    def started_at(self) -> float:
        return self.started_mono + self.wall_offset_s

    def body(self, phase: int) -> dict[str, Any]:
        """The result object upstream would send in `phase`."""
        status = self.final_status if phase == 2 else STATUSES[phase]
        body: dict[str, Any] = {
            "id": self.id,
            "status": LEGACY_STATUS[status] if self.legacy_status else status,
            "input": self.input,
            "data": self._data() if status == "COMPLETED" else None,
            "usage": self._usage(status),
        }
        if status == "FAILED":
            body["code"] = self.code
            body["message"] = self.message
        if phase == 2:
            body["provider_meta"] = {
                "simulator": _SIMULATOR,
                "family": self.family,
                "model": self.model,
                "final_at": self.final_at,
            }
        return body

    def answer(self, phase: int) -> _Answer:
        cached = self.answers[phase]
        if cached is None:
            # orjson's bytes keep their 4 KiB working buffer; a right-sized copy is what lets
            # 100,000 cached generations fit in tens of MB instead of hundreds.
            body = memoryview(orjson.dumps(self.body(phase))).tobytes()
            cached = self.answers[phase] = _answer(200, body)
        return cached

    def _usage(self, status: str) -> dict[str, int]:
        total = 0
        if status == "COMPLETED":
            total = _CREDITS[self.family] * (self._image_count() if self.family == "image" else 1)
        return {"total": total, "subscription": total, "permanent": 0}

    def _image_count(self) -> int:
        n = self.input.get("n")
        return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 10 else 1

    def _data(self) -> dict[str, Any]:
        base = f"https://cdn.example.com/output/{quote(self.id, safe='')}"
        if self.family == "image":
            width, height = 1024, 1024
            resolution = self.input.get("resolution")
            if isinstance(resolution, str):
                match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", resolution)
                if match:
                    width, height = int(match[1]), int(match[2])
            images = [
                {
                    "url": f"{base}-{i}.png",
                    "file_name": f"{self.id}-{i}.png",
                    "content_type": "image/png",
                    "width": width,
                    "height": height,
                }
                for i in range(self._image_count())
            ]
            prompt = self.input.get("prompt")
            return {
                "type": "image",
                "n": len(images),
                "actual_prompt": prompt if isinstance(prompt, str) else "",
                "images": images,
                "image": images[0],
            }
        if self.family == "video":
            return {
                "type": "video",
                "video": {
                    "url": f"{base}.mp4",
                    "file_name": f"{self.id}.mp4",
                    "content_type": "video/mp4",
                    "width": 1280,
                    "height": 720,
                    "duration": 5.0,
                },
            }
        return {
            "type": "audio",
            "audio": {
                "url": f"{base}.mp3",
                "file_name": f"{self.id}.mp3",
                "content_type": "audio/mpeg",
                "duration": 4.2,
            },
        }


# ---------------------------------------------------------------------------------------------
# The simulator


class _ControlError(Exception):
    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message


def _json_response(content: object, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


async def _read_json(request: Request, *, empty: object = None) -> object:
    raw = await request.body()
    if not raw.strip():
        return empty
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _ControlError(400, "invalid_json", f"body is not JSON: {exc}") from None


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class FakeUpstream:
    """The simulator's state and its Starlette app (`.app`); usable in-process as well.

    JSON shapes of the control API (`/_fake/`, no auth; errors are
    `{"error": <code>, "message": <text>}` with 400, 404 or 409):

    - `POST /_fake/generations` with a spec (see `add_generation`; `family` is required) ->
      201 `{"id", "family", "final_status", "started_at", "final_at"}` (unix seconds).
    - `POST /_fake/generations/bulk` `{"items": [spec, ...]}` -> 201 `{"items": [same, ...]}`;
      all or nothing.
    - `POST /_fake/generations/{id}/finish` optional `{"status": final status}` -> 200
      `{"id", "status", "final_at", "body"}`; idempotent for the same status, 409 if it is
      already final with another.
    - `GET /_fake/generations/{id}/polls` -> 200 `{"id", "count", "times", "status",
      "final_at"}`; also for ids that do not exist (`status`/`final_at` null). `final_at` is
      the scheduled time, in the future while not final.
    - `GET /_fake/stats` -> `{"polls", "unknown_id_polls", "by_status_code": {"200": n, ...},
      "faults": {"hang", "error", "rate_limit", "malformed"}, "generations": {"total",
      <status>: n, ...}}`.
    - `POST /_fake/reset` optional `{"generations": bool, "faults": bool}` -> 200; clears poll
      counters and stats always, releases hung polls, and optionally drops every generation
      or restores the configured faults.
    - `GET /_fake/faults` -> the FaultSettings as JSON; `PUT /_fake/faults` with some of its
      keys -> 200 with the merged settings.
    """

    def __init__(self, config: FakeUpstreamConfig | None = None) -> None:
        self.config = config or FakeUpstreamConfig()
        self.faults = dataclasses.replace(self.config.faults)
        self._faults_version = 0
        self.generations: dict[str, Generation] = {}
        # Separate streams so that, e.g., turning faults on does not change the ids drawn.
        self._id_rng = random.Random(f"{self.config.seed}:ids")
        self._lifecycle_rng = random.Random(f"{self.config.seed}:lifecycle")
        self._fault_rng = random.Random(f"{self.config.seed}:faults")
        key = self.config.api_key
        self._api_key = None if key is None else key.encode()
        self._expected_auth = b"" if key is None else b"Bearer " + key.encode()
        self._release_hangs = asyncio.Event()
        self._reset_counters()
        self.app = self._build_app()

    # -- counters ------------------------------------------------------------------------------

    def _reset_counters(self) -> None:
        self._poll_times: dict[str, array.array[float]] = {}
        self.poll_total = 0
        self.unknown_id_polls = 0
        self._by_status_code: dict[int, int] = {}
        self._fault_counts = {"hang": 0, "error": 0, "rate_limit": 0, "malformed": 0}

    def poll_count(self, gen_id: str) -> int:
        times = self._poll_times.get(gen_id)
        return 0 if times is None else len(times)

    def poll_times(self, gen_id: str) -> list[float]:
        """Unix times at which `gen_id` was polled, oldest first (faulted polls included)."""
        times = self._poll_times.get(gen_id)
        return [] if times is None else times.tolist()

    def polls_json(self, gen_id: str) -> dict[str, Any]:
        gen = self.generations.get(gen_id)
        return {
            "id": gen_id,
            "count": self.poll_count(gen_id),
            "times": self.poll_times(gen_id),
            "status": None if gen is None else gen.status_at(time.monotonic()),
            "final_at": None if gen is None else gen.final_at,
        }

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        by_status = dict.fromkeys(STATUSES, 0)
        for gen in self.generations.values():
            by_status[gen.status_at(now)] += 1
        return {
            "polls": self.poll_total,
            "unknown_id_polls": self.unknown_id_polls,
            "by_status_code": {str(k): v for k, v in sorted(self._by_status_code.items())},
            "faults": dict(self._fault_counts),
            "generations": {"total": len(self.generations), **by_status},
        }

    def reset(self, *, generations: bool = False, faults: bool = False) -> None:
        """Clear poll counters and stats; release hung polls; optionally more."""
        self._reset_counters()
        self.release_hangs()
        if generations:
            self.generations.clear()
        if faults:
            self.set_faults(self.config.faults)

    def release_hangs(self) -> None:
        """Let every poll held by a hang fault answer now."""
        self._release_hangs.set()
        self._release_hangs = asyncio.Event()

    # -- faults --------------------------------------------------------------------------------

    def set_faults(self, faults: FaultSettings) -> None:
        self.faults = dataclasses.replace(faults)
        self._faults_version += 1

    def update_faults(self, changes: Mapping[str, Any]) -> FaultSettings:
        """Apply a partial mapping (the JSON of PUT /_fake/faults); raises InvalidSpec."""
        self.set_faults(self.faults.merged(changes))
        return self.faults

    def _faults_for(self, gen: Generation) -> FaultSettings:
        if gen.faults_cache is None or gen.faults_cache_version != self._faults_version:
            assert gen.fault_overrides is not None
            gen.faults_cache = dataclasses.replace(self.faults, **gen.fault_overrides)
            gen.faults_cache_version = self._faults_version
        return gen.faults_cache

    # -- creating and finishing ----------------------------------------------------------------

    def _new_id(self) -> str:
        while True:
            gen_id = f"gen_{self._id_rng.getrandbits(64):016x}"
            if gen_id not in self.generations:
                return gen_id

    def _draw_duration(self, bounds: tuple[float, float]) -> float:
        return self._lifecycle_rng.uniform(*bounds) * self.config.time_scale

    def _draw_outcome(self) -> FinalStatus:
        draw = self._lifecycle_rng.random()
        if draw < self.config.failed_fraction:
            return "FAILED"
        if draw < self.config.failed_fraction + self.config.canceled_fraction:
            return "CANCELED"
        return "COMPLETED"

    def add_generation(
        self,
        family: Family,
        *,
        id: str | None = None,  # the JSON key it mirrors
        queue_s: float | None = None,
        run_s: float | None = None,
        final_at_s: float | None = None,
        final_status: FinalStatus | None = None,
        legacy_status: bool = False,
        not_found_for_s: float = 0.0,
        faults: Mapping[str, Any] | None = None,
        input: Mapping[str, Any] | None = None,  # upstream's field name
        code: str | None = None,
        message: str | None = None,
        model: str | None = None,
    ) -> Generation:
        """Create a scripted generation; raises InvalidSpec (DuplicateId) on a bad spec.

        Durations given here are seconds of real time; only drawn ones are scaled by
        `time_scale`. `final_at_s` is a shorthand for "final after this long": the queue takes
        `queue_s` if given, else a fifth of it. `not_found_for_s`: polls answer 404 for this
        long after creation (eventual consistency). `faults` overrides the global settings
        for this id. `code`/`message` are used if it ends FAILED (drawn when omitted).
        """
        spec = self._check_spec(
            {
                "family": family,
                "id": id,
                "queue_s": queue_s,
                "run_s": run_s,
                "final_at_s": final_at_s,
                "final_status": final_status,
                "legacy_status": legacy_status,
                "not_found_for_s": not_found_for_s,
                "faults": faults,
                "input": input,
                "code": code,
                "message": message,
            }
        )
        if spec.get("id") in self.generations:
            raise DuplicateId(f"generation {spec['id']!r} exists already")
        return self._create(spec, model=model)

    def _check_spec(self, raw: object) -> dict[str, Any]:
        """Validate one spec (JSON object or add_generation's arguments); None means absent."""
        if not isinstance(raw, Mapping):
            raise InvalidSpec("a generation spec must be a JSON object")
        unknown = set(raw) - _SPEC_KEYS
        if unknown:
            raise InvalidSpec(f"unknown keys {sorted(unknown)}; known: {sorted(_SPEC_KEYS)}")
        spec = {k: v for k, v in raw.items() if v is not None}
        if spec.get("family") not in FAMILIES:
            raise InvalidSpec(f"family must be one of {list(FAMILIES)}, got {raw.get('family')!r}")
        gen_id = spec.get("id")
        if gen_id is not None and (
            not isinstance(gen_id, str) or not 0 < len(gen_id) <= 256 or "/" in gen_id
        ):
            raise InvalidSpec("id must be a string of 1-256 characters without '/'")
        for key in ("queue_s", "run_s", "final_at_s", "not_found_for_s"):
            if key in spec:
                spec[key] = _check_number(key, spec[key])
        if "final_at_s" in spec:
            if "run_s" in spec:
                raise InvalidSpec("give final_at_s or run_s, not both")
            if spec.get("queue_s", 0.0) > spec["final_at_s"]:
                raise InvalidSpec("queue_s must not exceed final_at_s")
        if "final_status" in spec and spec["final_status"] not in FINAL_STATUSES:
            raise InvalidSpec(f"final_status must be one of {list(FINAL_STATUSES)}")
        if not isinstance(spec.get("legacy_status", False), bool):
            raise InvalidSpec("legacy_status must be true or false")
        if "faults" in spec:
            spec["faults"] = FaultSettings.validate_changes(spec["faults"])
        if "input" in spec and not isinstance(spec["input"], Mapping):
            raise InvalidSpec("input must be a JSON object")
        for key in ("code", "message"):
            if key in spec and not isinstance(spec[key], str):
                raise InvalidSpec(f"{key} must be a string")
        return spec

    def _create(self, spec: Mapping[str, Any], *, model: str | None = None) -> Generation:
        family: Family = spec["family"]
        queue_bounds, run_bounds = FAMILY_DURATIONS_S[family]
        if "final_at_s" in spec:
            final_at_s: float = spec["final_at_s"]
            queue_s = spec.get("queue_s", final_at_s / 5)
            run_s = final_at_s - queue_s
        else:
            queue_s = spec.get("queue_s")
            if queue_s is None:
                queue_s = self._draw_duration(queue_bounds)
            run_s = spec.get("run_s")
            if run_s is None:
                run_s = self._draw_duration(run_bounds)
        final_status: FinalStatus = spec.get("final_status") or self._draw_outcome()
        code, message = spec.get("code"), spec.get("message")
        if final_status == "FAILED" and (code is None or message is None):
            reason, text = _FAILURES[self._lifecycle_rng.randrange(len(_FAILURES))]
            code = code or f"{_CODE_PREFIX[family]}_GENERATION_{reason}"
            message = message or text
        gen_id: str = spec.get("id") or self._new_id()
        now = time.monotonic()
        gen = Generation(
            id=gen_id,
            family=family,
            model=model or f"fake/{family}",
            input=dict(spec["input"]) if spec.get("input") else _DEFAULT_INPUT[family],
            created_mono=now,
            wall_offset_s=time.time() - now,
            started_mono=now + queue_s,
            final_mono=now + queue_s + run_s,
            final_status=final_status,
            legacy_status=spec.get("legacy_status", False),
            not_found_until_mono=now + spec.get("not_found_for_s", 0.0),
            fault_overrides=spec.get("faults") or None,
            code=code,
            message=message,
        )
        self.generations[gen_id] = gen
        return gen

    def finish(self, gen_id: str, status: FinalStatus | None = None) -> Generation:
        """Make `gen_id` final now (with `status`, default its scripted one).

        Idempotent if it is already final with that status; raises UnknownGeneration, or
        AlreadyFinal if it is already final with another status.
        """
        gen = self.generations.get(gen_id)
        if gen is None:
            raise UnknownGeneration(gen_id)
        if status is not None and status not in FINAL_STATUSES:
            raise InvalidSpec(f"status must be one of {list(FINAL_STATUSES)}")
        now = time.monotonic()
        if gen.phase_at(now) == 2:
            if status is not None and status != gen.final_status:
                raise AlreadyFinal(f"{gen_id} is already final as {gen.final_status}")
            return gen
        if status is not None and status != gen.final_status:
            gen.final_status = status
            if status == "FAILED" and (gen.code is None or gen.message is None):
                gen.code = f"{_CODE_PREFIX[gen.family]}_GENERATION_FAILED"
                gen.message = "The generation failed."
        gen.final_mono = now
        gen.started_mono = min(gen.started_mono, now)
        gen.not_found_until_mono = min(gen.not_found_until_mono, now)
        gen.answers[2] = None  # the final body carries the final time
        return gen

    @staticmethod
    def created_json(gen: Generation) -> dict[str, Any]:
        return {
            "id": gen.id,
            "family": gen.family,
            "final_status": gen.final_status,
            "started_at": gen.started_at,
            "final_at": gen.final_at,
        }

    # -- the upstream API ----------------------------------------------------------------------

    def _auth_failure(self, headers: Iterable[tuple[bytes, bytes]], mode: str) -> _Answer | None:
        if mode != "ok":
            return _FORBIDDEN if mode == "403" else _UNAUTHORIZED
        for name, value in headers:
            if name == b"authorization":
                if value == self._expected_auth:
                    return None
                scheme, _, token = value.partition(b" ")
                token = token.strip()
                if scheme.lower() != b"bearer" or not token:
                    return _UNAUTHORIZED
                if self._api_key is None or token == self._api_key:
                    return None
                return _UNAUTHORIZED
        return _UNAUTHORIZED

    async def _send(self, send: Send, answer: _Answer) -> None:
        status, headers, body = answer
        self._by_status_code[status] = self._by_status_code.get(status, 0) + 1
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _hang(self, receive: Receive, hang_s: float) -> None:
        # Waits for the client too: a hung request nobody waits for would hold up the
        # server's shutdown for hang_s.
        waiters = [
            asyncio.ensure_future(_until_disconnect(receive)),
            asyncio.ensure_future(self._release_hangs.wait()),
        ]
        try:
            await asyncio.wait(waiters, timeout=hang_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def poll(self, gen_id: str, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer GET /v1/generation/{gen_id}: record the poll, then faults, auth, the body."""
        times = self._poll_times.get(gen_id)
        if times is None:
            times = self._poll_times[gen_id] = array.array("d")
        times.append(time.time())
        self.poll_total += 1
        gen = self.generations.get(gen_id)
        if gen is None:
            self.unknown_id_polls += 1
            faults = self.faults
        else:
            faults = self.faults if gen.fault_overrides is None else self._faults_for(gen)
        if faults.latency_s > 0:
            await asyncio.sleep(faults.latency_s)
        failure = self._auth_failure(scope["headers"], faults.auth_mode)
        if failure is not None:
            await self._send(send, failure)
            return
        if faults.random_rate > 0:
            draw = self._fault_rng.random()
            if draw < faults.hang_rate:
                self._fault_counts["hang"] += 1
                await self._hang(receive, faults.hang_s)
                gen = self.generations.get(gen_id)  # may have been reset meanwhile
            elif (draw := draw - faults.hang_rate) < faults.error_rate:
                self._fault_counts["error"] += 1
                choice = self._fault_rng.randrange(len(_SERVER_ERRORS))
                await self._send(send, _SERVER_ERRORS[choice])
                return
            elif (draw := draw - faults.error_rate) < faults.rate_limit_rate:
                self._fault_counts["rate_limit"] += 1
                status, headers, body = _answer(429, _RATE_LIMITED_BODY)
                if faults.retry_after_s is not None:
                    headers.append((b"retry-after", _format_retry_after(faults.retry_after_s)))
                await self._send(send, (status, headers, body))
                return
            elif draw - faults.rate_limit_rate < faults.malformed_rate:
                self._fault_counts["malformed"] += 1
                choice = self._fault_rng.randrange(len(_MALFORMED_BODIES))
                await self._send(send, _answer(200, _MALFORMED_BODIES[choice]))
                return
        now = time.monotonic()
        if gen is None or now < gen.not_found_until_mono:
            await self._send(send, _NOT_FOUND)
            return
        await self._send(send, gen.answer(gen.phase_at(now)))

    async def _create_from_model(self, request: Request) -> Response:
        faults = self.faults
        if faults.latency_s > 0:
            await asyncio.sleep(faults.latency_s)
        failure = self._auth_failure(request.scope["headers"], faults.auth_mode)
        if failure is None:
            raw = await request.body()
            try:
                parsed: object = orjson.loads(raw) if raw.strip() else {}
            except orjson.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                provider: str = request.path_params["provider"]
                model = f"{provider}/{request.path_params['model']}"
                spec = {"family": family_for_model(model), "input": parsed or None}
                gen = self._create(spec, model=model)
                return Response(gen.answer(0)[2], media_type="application/json")
            failure = _error_answer(
                400, "invalid_input", "INVALID_INPUT", "The body must be a JSON object."
            )
        return Response(failure[2], status_code=failure[0], media_type="application/json")

    # -- the control API -----------------------------------------------------------------------

    async def _control_create(self, request: Request) -> Response:
        spec = self._check_spec(await _read_json(request))
        if spec.get("id") in self.generations:
            raise DuplicateId(f"generation {spec['id']!r} exists already")
        return _json_response(self.created_json(self._create(spec)), 201)

    async def _control_bulk(self, request: Request) -> Response:
        body = await _read_json(request)
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise InvalidSpec('the body must be {"items": [spec, ...]}')
        specs = []
        seen: set[str] = set()
        for index, item in enumerate(items):
            try:
                spec = self._check_spec(item)
            except InvalidSpec as exc:
                raise InvalidSpec(f"items[{index}]: {exc}") from None
            gen_id = spec.get("id")
            if gen_id is not None:
                if gen_id in self.generations or gen_id in seen:
                    raise DuplicateId(f"items[{index}]: generation {gen_id!r} exists already")
                seen.add(gen_id)
            specs.append(spec)
        created = [self.created_json(self._create(spec)) for spec in specs]
        return _json_response({"items": created}, 201)

    async def _control_finish(self, request: Request) -> Response:
        body = await _read_json(request, empty={})
        if not isinstance(body, dict) or set(body) - {"status"}:
            raise InvalidSpec('the body must be {"status": "COMPLETED"|"FAILED"|"CANCELED"}')
        gen = self.finish(request.path_params["id"], body.get("status"))
        return _json_response(
            {
                "id": gen.id,
                "status": gen.final_status,
                "final_at": gen.final_at,
                "body": gen.body(2),
            }
        )

    async def _control_polls(self, request: Request) -> Response:
        return _json_response(self.polls_json(request.path_params["id"]))

    async def _control_stats(self, request: Request) -> Response:
        return _json_response(self.stats())

    async def _control_reset(self, request: Request) -> Response:
        body = await _read_json(request, empty={})
        if (
            not isinstance(body, dict)
            or set(body) - {"generations", "faults"}
            or not all(isinstance(v, bool) for v in body.values())
        ):
            raise InvalidSpec('the body must be {"generations": bool, "faults": bool} or empty')
        self.reset(generations=body.get("generations", False), faults=body.get("faults", False))
        return _json_response(
            {"reset": {"polls": True, **{k: body.get(k, False) for k in ("generations", "faults")}}}
        )

    async def _control_faults(self, request: Request) -> Response:
        if request.method == "PUT":
            changes = await _read_json(request, empty={})
            if not isinstance(changes, dict):
                raise InvalidSpec("the body must be a JSON object of fault settings")
            self.update_faults(changes)
        return _json_response(self.faults.to_json())

    @staticmethod
    def _control_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, Conflict):
            return _json_response({"error": "conflict", "message": str(exc)}, 409)
        if isinstance(exc, InvalidSpec):
            return _json_response({"error": "bad_request", "message": str(exc)}, 400)
        if isinstance(exc, UnknownGeneration):
            message = f"no generation {exc.args[0]!r}"
            return _json_response({"error": "not_found", "message": message}, 404)
        assert isinstance(exc, _ControlError)
        return _json_response({"error": exc.error, "message": exc.message}, exc.status)

    def _build_app(self) -> Starlette:
        handler = self._control_error
        routes = [
            # GET /v1/generation/{id} is answered by _PollFastPath before routing.
            Route(
                "/v1/generation/{provider}/{model:path}", self._create_from_model, methods=["POST"]
            ),
            Route("/_fake/generations", self._control_create, methods=["POST"]),
            Route("/_fake/generations/bulk", self._control_bulk, methods=["POST"]),
            Route("/_fake/generations/{id}/finish", self._control_finish, methods=["POST"]),
            Route("/_fake/generations/{id}/polls", self._control_polls, methods=["GET"]),
            Route("/_fake/stats", self._control_stats, methods=["GET"]),
            Route("/_fake/reset", self._control_reset, methods=["POST"]),
            Route("/_fake/faults", self._control_faults, methods=["GET", "PUT"]),
        ]
        app = Starlette(
            routes=routes,
            exception_handlers={
                InvalidSpec: handler,
                UnknownGeneration: handler,
                _ControlError: handler,
            },
            middleware=[Middleware(_PollFastPath, upstream=self)],
            max_body_size=_MAX_BODY_BYTES,
        )
        app.state.fake_upstream = self
        return app


class _PollFastPath:
    """Answers GET /v1/generation/{id} ahead of Starlette's router: the benchmarks' hot path.

    A middleware rather than a Route so a poll costs no routing, Request or Response objects;
    it still sits inside Starlette's ServerErrorMiddleware.
    """

    __slots__ = ("app", "upstream")

    def __init__(self, app: ASGIApp, upstream: FakeUpstream) -> None:
        self.app = app
        self.upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            path: str = scope["path"]
            if path.startswith(POLL_PREFIX):
                gen_id = path[len(POLL_PREFIX) :]
                if gen_id and "/" not in gen_id:
                    await self.upstream.poll(gen_id, scope, receive, send)
                    return
        await self.app(scope, receive, send)


def create_fake_upstream(config: FakeUpstreamConfig | None = None) -> Starlette:
    """A new simulator app; its state is `app.state.fake_upstream` (a FakeUpstream)."""
    return FakeUpstream(config).app


def run_fake_upstream(host: str, port: int, config: FakeUpstreamConfig) -> None:
    """Serve the simulator under uvicorn until interrupted (what `relay fake-upstream` runs)."""
    key = "any bearer key" if config.api_key is None else "the key in RELAY_FAKE_API_KEY"
    print(  # noqa: T201 (the one line a person starting it by hand wants to see)
        f"relay fake-upstream: http://{host}:{port}/v1/generation/{{id}} (accepts {key}; "
        f"seed {config.seed}, time scale {config.time_scale:g})",
        flush=True,
    )
    uvicorn.run(
        create_fake_upstream(config),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        # Polls held by a hang fault must not keep Ctrl-C waiting for an hour.
        timeout_graceful_shutdown=1,
    )
