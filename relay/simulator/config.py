"""The simulator's settings: FakeUpstreamConfig (fixed at start) and FaultSettings (changeable
at run time), their validation, and the one reader of the environment (`from_env`).

It must not hold state or know about HTTP: the app turns InvalidSpec into a 400.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

from relay.simulator.errors import InvalidSpec

AuthMode = Literal["ok", "401", "403"]
_RATE_KEYS: Final = ("hang_rate", "error_rate", "rate_limit_rate", "malformed_rate")
# Settings that take one of a few values, and the numbers that may also be null.
_CHOICES: Final[Mapping[str, tuple[object, ...]]] = {
    "auth_mode": ("ok", "401", "403"),
    "running_list_status": (None, 404, 405, 501),
    "create_refusal": (None, 402, 422, 429, 500),
    "create_without_id": (False, True),
}
_OPTIONAL: Final = frozenset(["retry_after_s", "sse_cut_after_s", "sse_cut_after_frames"])
_T = TypeVar("_T")


def check_number(
    name: str, value: object, *, minimum: float = 0.0, maximum: float = math.inf
) -> float:
    """`value` as a float if it is a finite JSON number in range; else InvalidSpec naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSpec(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or not minimum <= number <= maximum:
        upper = "" if maximum == math.inf else f" and <= {maximum:g}"
        raise InvalidSpec(f"{name} must be finite, >= {minimum:g}{upper}, got {value!r}")
    return number


@dataclass(slots=True)
class FaultSettings:
    """Faults applied to upstream GETs (polls and the running list); rates are fractions of
    requests, drawn from the seeded RNG.

    One uniform draw per request picks at most one of hang, error, rate limit, malformed, in
    that order of thresholds. Latency is added to every request, before the auth check.
    """

    error_rate: float = 0.0  # answered 500, 502 (an HTML body, as proxies send) or 503
    rate_limit_rate: float = 0.0  # answered 429
    retry_after_s: float | None = 1.0  # Retry-After sent with 429; None sends no header
    latency_s: float = 0.0  # added to every poll
    hang_rate: float = 0.0  # held for hang_s (or until the client goes), then answered normally
    hang_s: float = 3600.0
    malformed_rate: float = 0.0  # answered 200 with invalid JSON or a JSON non-object
    auth_mode: AuthMode = "ok"  # "401"/"403": every upstream request gets that answer
    # 404/405/501: GET /v1/generations/running answers that, as an upstream without it would
    running_list_status: int | None = None
    # Creates (POST /v1/generation/..., plain and SSE); random poll faults do not apply to them.
    create_refusal: int | None = None  # 402, 422, 429 or 500 in the upstream's error shape
    create_latency_s: float = 0.0  # added to latency_s for creates
    # Held after the generation is made, before it is answered: an upstream that created it
    # but answers late (the client may give up first).
    create_answer_delay_s: float = 0.0
    create_without_id: bool = False  # a 2xx answer whose body (or first frame) has no "id"
    sse_cut_after_frames: int | None = None  # end SSE streams after this many frames
    sse_cut_after_s: float | None = None  # end SSE streams after this long

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
            choices = _CHOICES.get(key)
            if choices is not None:
                if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
                    raise InvalidSpec(f"{key} must be one of {list(choices)}, got {value!r}")
                checked[key] = value
            elif value is None and key in _OPTIONAL:
                checked[key] = None
            elif key == "sse_cut_after_frames":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise InvalidSpec(f"{key} must be null or an integer >= 1, got {value!r}")
                checked[key] = value
            elif key.endswith("_rate"):
                checked[key] = check_number(key, value, maximum=1.0)
            else:
                checked[key] = check_number(key, value)
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


def _from_env(
    environ: Mapping[str, str],
    name: str,
    default: _T,
    parse: Callable[[str], _T],
    expected: str,
) -> _T:
    """The variable `name` parsed, `default` when unset or empty; ValueError naming it."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return parse(raw)
    except ValueError:
        raise ValueError(f"{name} must be {expected}, got {raw!r}") from None


def _parse_time_scale(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value < 0:
        raise ValueError(raw)
    return value


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
            check_number("time_scale", self.time_scale)
            check_number("failed_fraction", self.failed_fraction, maximum=1.0)
            check_number("canceled_fraction", self.canceled_fraction, maximum=1.0)
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
        return cls(
            api_key=environ.get("RELAY_FAKE_API_KEY", "").strip() or None,
            seed=_from_env(environ, "RELAY_FAKE_SEED", 0, int, "an integer"),
            time_scale=_from_env(
                environ,
                "RELAY_FAKE_TIME_SCALE",
                1.0,
                _parse_time_scale,
                "a finite number >= 0",
            ),
        )
