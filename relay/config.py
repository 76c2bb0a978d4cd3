"""Settings from RELAY_* environment variables: the only module that reads the environment.

Every value is parsed and checked here, once, at start. A bad value raises `ConfigError`
naming the variable and why; the CLI turns that into one line on stderr and exit code 2.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

from relay.errors import ConfigError
from relay.secretbox import SecretKeyError, check_secret_key
from relay.signing import SECRET_PREFIX, check_secret

T = TypeVar("T")

DEFAULT_RETRY_SCHEDULE_S = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
DEFAULT_PROXY_MAX_BODY_BYTES = 100 * 2**20
# Test seams (RELAY_FAILPOINT): the process SIGKILLs itself at the named point of a create
# through the relay, so tests can prove what a crash there leaves behind. Never for production.
FAILPOINTS = ("proxy.before_commit", "proxy.after_commit")


@dataclass(frozen=True)
class Settings:
    """The relay's configuration; field names follow the RELAY_* variables."""

    database_url: str = field(default="sqlite+aiosqlite:///./relay.db", repr=False)
    host: str = "127.0.0.1"
    port: int = 8080
    upstream_url: str = "https://open.skills.video/api"
    # Kept out of repr so a logged or printed Settings never shows the secret.
    upstream_api_key: str | None = field(default=None, repr=False)
    # Seals the signing secrets at rest (secretbox.py); never shown.
    secret_key: str | None = field(default=None, repr=False)
    upstream_timeout_s: float = 20.0
    upstream_max_rps: float = 50.0
    poll_min_interval_s: float = 2.0
    poll_max_interval_s: float = 30.0
    generation_ttl_s: float = 86400.0
    not_found_grace_s: float = 600.0
    delivery_timeout_s: float = 15.0
    delivery_retry_schedule_s: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE_S
    allow_private_callbacks: bool = False
    rate_limit_per_s: float = 1000.0
    auth_failure_limit_per_s: float = 20.0
    max_active_per_key: int = 100_000
    # Beyond the contract's table: operational knobs with safe defaults.
    lease_s: float = 30.0
    retention_s: float = 7 * 86400.0
    delivery_concurrency: int = 256
    delivery_per_host: int = 16
    poll_concurrency: int = 64
    upstream_max_body_bytes: int = 2**20
    max_connections: int = 1024
    body_timeout_s: float = 10.0
    log_level: str = "INFO"
    # Push hints (the upstream's workspace webhooks) and batch sweeps.
    upstream_webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    hint_memory_s: float = 600.0
    hint_silence_s: float = 900.0
    hinted_poll_interval_s: float = 300.0
    sweep: str = "auto"
    sweep_min_interval_s: float = 1.0
    # Operators: /metrics and /dashboard exist (and metrics are collected) only with a token.
    admin_token: str | None = field(default=None, repr=False)
    log_format: str = "text"
    access_log: bool = False
    # Creating generations through the relay (proxy.py).
    proxy_max_body_bytes: int = DEFAULT_PROXY_MAX_BODY_BYTES
    upstream_sse: bool = False
    failpoint: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every RELAY_* variable; raise ConfigError on the first bad one."""
        env = os.environ if environ is None else environ
        reader = _Reader(env)
        settings = cls(
            database_url=reader.get("RELAY_DATABASE_URL", cls.database_url, _database_url),
            host=reader.get("RELAY_HOST", cls.host, _non_empty),
            port=reader.get("RELAY_PORT", cls.port, _port),
            upstream_url=reader.get("RELAY_UPSTREAM_URL", cls.upstream_url, _http_url),
            upstream_api_key=reader.get("RELAY_UPSTREAM_API_KEY", None, _non_empty),
            secret_key=reader.get("RELAY_SECRET_KEY", None, _secret_key),
            upstream_timeout_s=reader.get("RELAY_UPSTREAM_TIMEOUT", 20.0, _positive_seconds),
            upstream_max_rps=reader.get("RELAY_UPSTREAM_MAX_RPS", 50.0, _positive_number),
            poll_min_interval_s=reader.get("RELAY_POLL_MIN_INTERVAL", 2.0, _positive_seconds),
            poll_max_interval_s=reader.get("RELAY_POLL_MAX_INTERVAL", 30.0, _positive_seconds),
            generation_ttl_s=reader.get("RELAY_GENERATION_TTL", 86400.0, _positive_seconds),
            not_found_grace_s=reader.get("RELAY_NOT_FOUND_GRACE", 600.0, _positive_seconds),
            delivery_timeout_s=reader.get("RELAY_DELIVERY_TIMEOUT", 15.0, _positive_seconds),
            delivery_retry_schedule_s=reader.get(
                "RELAY_DELIVERY_RETRY_SCHEDULE", DEFAULT_RETRY_SCHEDULE_S, _schedule
            ),
            allow_private_callbacks=reader.get("RELAY_ALLOW_PRIVATE_CALLBACKS", False, _bool),
            rate_limit_per_s=reader.get("RELAY_RATE_LIMIT", 1000.0, _non_negative_number),
            auth_failure_limit_per_s=reader.get(
                "RELAY_AUTH_FAILURE_LIMIT", 20.0, _non_negative_number
            ),
            max_active_per_key=reader.get("RELAY_MAX_ACTIVE_PER_KEY", 100_000, _positive_int),
            lease_s=reader.get("RELAY_LEASE", 30.0, _lease),
            retention_s=reader.get("RELAY_RETENTION", 7 * 86400.0, _positive_seconds),
            delivery_concurrency=reader.get("RELAY_DELIVERY_CONCURRENCY", 256, _positive_int),
            delivery_per_host=reader.get("RELAY_DELIVERY_PER_HOST", 16, _positive_int),
            poll_concurrency=reader.get("RELAY_POLL_CONCURRENCY", 64, _positive_int),
            upstream_max_body_bytes=reader.get("RELAY_UPSTREAM_MAX_BODY", 2**20, _positive_int),
            max_connections=reader.get("RELAY_MAX_CONNECTIONS", 1024, _positive_int),
            body_timeout_s=reader.get("RELAY_BODY_TIMEOUT", 10.0, _positive_seconds),
            log_level=reader.get("RELAY_LOG_LEVEL", "INFO", _log_level),
            upstream_webhook_secrets=reader.get(
                "RELAY_UPSTREAM_WEBHOOK_SECRET", (), _webhook_secrets
            ),
            hint_memory_s=reader.get("RELAY_HINT_MEMORY", 600.0, _positive_seconds),
            hint_silence_s=reader.get("RELAY_HINT_SILENCE", 900.0, _positive_seconds),
            hinted_poll_interval_s=reader.get(
                "RELAY_HINTED_POLL_INTERVAL", 300.0, _positive_seconds
            ),
            sweep=reader.get("RELAY_SWEEP", "auto", _sweep_mode),
            sweep_min_interval_s=reader.get("RELAY_SWEEP_MIN_INTERVAL", 1.0, _positive_seconds),
            admin_token=reader.get("RELAY_ADMIN_TOKEN", None, _admin_token),
            log_format=reader.get("RELAY_LOG_FORMAT", "text", _log_format),
            access_log=reader.get("RELAY_ACCESS_LOG", False, _bool),
            proxy_max_body_bytes=reader.get(
                "RELAY_PROXY_MAX_BODY", DEFAULT_PROXY_MAX_BODY_BYTES, _positive_int
            ),
            upstream_sse=reader.get("RELAY_UPSTREAM_SSE", False, _bool),
            failpoint=reader.get("RELAY_FAILPOINT", None, _failpoint),
        )
        if settings.poll_max_interval_s < settings.poll_min_interval_s:
            raise ConfigError(
                "RELAY_POLL_MAX_INTERVAL",
                f"must be at least RELAY_POLL_MIN_INTERVAL ({settings.poll_min_interval_s:g})",
            )
        return settings


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def get(self, name: str, default: T, parse: Callable[[str], T]) -> T:
        raw = self._env.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except ValueError as exc:
            raise ConfigError(name, f"{exc} (got {_shown(name, raw)})") from None


def _shown(name: str, raw: str) -> str:
    # Never echo a secret back into logs or terminals.
    hidden = ("KEY", "SECRET", "TOKEN", "DATABASE_URL")
    if any(word in name for word in hidden) or "@" in raw:
        return "a value that is not shown"
    return repr(raw if len(raw) <= 60 else raw[:57] + "...")


def _non_empty(raw: str) -> str:
    return raw


def _number(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("must be a number") from None
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _number_where(accept: Callable[[float], bool], why: str) -> Callable[[str], float]:
    """A parser of finite numbers that `accept` allows; `why` says what is expected."""

    def parse(raw: str) -> float:
        value = _number(raw)
        if not accept(value):
            raise ValueError(why)
        return value

    return parse


_positive_number = _number_where(lambda v: v > 0, "must be greater than 0")
_non_negative_number = _number_where(lambda v: v >= 0, "must be 0 or more")
_positive_seconds = _number_where(lambda v: v > 0, "must be a number of seconds greater than 0")


def _lease(raw: str) -> float:
    value = _positive_seconds(raw)
    if value > 60:
        raise ValueError(
            "must be at most 60 seconds (work of a dead process is taken over within 60 s)"
        )
    return value


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError("must be a whole number") from None
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def _secret_key(raw: str) -> str:
    try:
        return check_secret_key(raw)
    except SecretKeyError as exc:
        raise ValueError(str(exc)) from None


def _port(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError("must be a port number") from None
    if not 0 <= value <= 65535:
        raise ValueError("must be between 0 and 65535")
    return value


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")


def _schedule(raw: str) -> tuple[float, ...]:
    parts = [part.strip() for part in raw.split(",")]
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        raise ValueError("must be a comma-separated list of seconds, e.g. 5,300,1800") from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError("every delay must be a finite number of seconds, 0 or more")
    return values


def _http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ValueError("must be an absolute http or https URL")
    return raw.rstrip("/")


def _database_url(raw: str) -> str:
    if raw.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        return raw
    if raw.startswith(("postgres://", "postgresql://")):
        # Accept the URL users copy from their provider and pick the async driver for them.
        return "postgresql+asyncpg://" + raw.split("://", 1)[1]
    raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")


def _failpoint(raw: str) -> str:
    if raw not in FAILPOINTS:
        raise ValueError(f"must be one of {', '.join(FAILPOINTS)} (a test seam)")
    return raw


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return level


def _webhook_secrets(raw: str) -> tuple[str, ...]:
    secrets = tuple(part.strip() for part in raw.split(",") if part.strip())
    for secret in secrets:
        if not secret.startswith(SECRET_PREFIX):
            raise ValueError("must be comma-separated secrets that each start with whsec_")
        check_secret(secret)
    return secrets


def _sweep_mode(raw: str) -> str:
    mode = raw.lower()
    if mode not in {"auto", "off"}:
        raise ValueError("must be auto or off")
    return mode


def _log_format(raw: str) -> str:
    value = raw.lower()
    if value not in {"text", "json"}:
        raise ValueError("must be text or json")
    return value


ADMIN_TOKEN_MIN_CHARS = 16


def _admin_token(raw: str) -> str:
    # It guards every subscription's callback URL and the relay's health: not a password
    # to guess. Printable ASCII only, so it travels unchanged in a header and a cookie.
    if len(raw) < ADMIN_TOKEN_MIN_CHARS:
        raise ValueError(
            f"must be at least {ADMIN_TOKEN_MIN_CHARS} characters "
            "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if not all(33 <= ord(c) <= 126 for c in raw):
        raise ValueError("must be printable ASCII without spaces")
    return raw
