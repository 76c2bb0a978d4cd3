"""Settings.from_env: the contract's defaults, every RELAY_* variable parsed, bad values named."""

from __future__ import annotations

from typing import Any

import pytest

from relay.config import Settings
from relay.errors import ConfigError

SECRET = "sk-live-very-secret-upstream-key"


def test_defaults_match_the_contract_table() -> None:
    """With no RELAY_* set, every setting has the contract's documented default."""
    settings = Settings.from_env({})
    assert settings.database_url == "sqlite+aiosqlite:///./relay.db"
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.upstream_url == "https://open.skills.video/api"
    assert settings.upstream_api_key is None
    assert settings.upstream_timeout_s == 20
    assert settings.upstream_max_rps == 50
    assert settings.poll_min_interval_s == 2
    assert settings.poll_max_interval_s == 30
    assert settings.generation_ttl_s == 86400
    assert settings.not_found_grace_s == 600
    assert settings.delivery_timeout_s == 15
    assert settings.delivery_retry_schedule_s == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert settings.allow_private_callbacks is False
    assert settings.rate_limit_per_s == 1000
    assert settings.proxy_max_body_bytes == 104857600
    assert settings.upstream_sse is False
    assert settings.failpoint is None
    assert settings == Settings()


def test_from_env_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit mapping, from_env reads os.environ."""
    monkeypatch.setenv("RELAY_PORT", "9123")
    assert Settings.from_env().port == 9123


@pytest.mark.parametrize(
    ("variable", "raw", "field", "expected"),
    [
        (
            "RELAY_DATABASE_URL",
            "sqlite+aiosqlite:////tmp/x.db",
            "database_url",
            "sqlite+aiosqlite:////tmp/x.db",
        ),
        (
            "RELAY_DATABASE_URL",
            "postgresql+asyncpg://u@h/db",
            "database_url",
            "postgresql+asyncpg://u@h/db",
        ),
        (
            "RELAY_DATABASE_URL",
            "postgresql://u@h/db",
            "database_url",
            "postgresql+asyncpg://u@h/db",
        ),
        ("RELAY_HOST", "0.0.0.0", "host", "0.0.0.0"),
        ("RELAY_PORT", "9000", "port", 9000),
        ("RELAY_PORT", "0", "port", 0),
        (
            "RELAY_UPSTREAM_URL",
            "http://127.0.0.1:8090/api/",
            "upstream_url",
            "http://127.0.0.1:8090/api",
        ),
        ("RELAY_UPSTREAM_API_KEY", SECRET, "upstream_api_key", SECRET),
        ("RELAY_UPSTREAM_TIMEOUT", "0.2", "upstream_timeout_s", 0.2),
        ("RELAY_UPSTREAM_MAX_RPS", "12.5", "upstream_max_rps", 12.5),
        ("RELAY_POLL_MIN_INTERVAL", "0.2", "poll_min_interval_s", 0.2),
        ("RELAY_POLL_MAX_INTERVAL", "45", "poll_max_interval_s", 45.0),
        ("RELAY_GENERATION_TTL", "3600", "generation_ttl_s", 3600.0),
        ("RELAY_NOT_FOUND_GRACE", "0.5", "not_found_grace_s", 0.5),
        ("RELAY_DELIVERY_TIMEOUT", "1.5", "delivery_timeout_s", 1.5),
        (
            "RELAY_DELIVERY_RETRY_SCHEDULE",
            "0.1, 0.2,0.3",
            "delivery_retry_schedule_s",
            (0.1, 0.2, 0.3),
        ),
        ("RELAY_DELIVERY_RETRY_SCHEDULE", "0", "delivery_retry_schedule_s", (0.0,)),
        ("RELAY_ALLOW_PRIVATE_CALLBACKS", "true", "allow_private_callbacks", True),
        ("RELAY_ALLOW_PRIVATE_CALLBACKS", "1", "allow_private_callbacks", True),
        ("RELAY_ALLOW_PRIVATE_CALLBACKS", "FALSE", "allow_private_callbacks", False),
        ("RELAY_RATE_LIMIT", "0", "rate_limit_per_s", 0.0),
        ("RELAY_RATE_LIMIT", "2", "rate_limit_per_s", 2.0),
        ("RELAY_POLL_MIN_INTERVAL", " 3 ", "poll_min_interval_s", 3.0),
        ("RELAY_ADMIN_TOKEN", "a" * 16, "admin_token", "a" * 16),
        ("RELAY_LOG_FORMAT", "JSON", "log_format", "json"),
        ("RELAY_ACCESS_LOG", "on", "access_log", True),
        ("RELAY_PROXY_MAX_BODY", "1048576", "proxy_max_body_bytes", 1048576),
        ("RELAY_UPSTREAM_SSE", "true", "upstream_sse", True),
        ("RELAY_FAILPOINT", "proxy.after_commit", "failpoint", "proxy.after_commit"),
        ("RELAY_FAILPOINT", "proxy.before_commit", "failpoint", "proxy.before_commit"),
    ],
)
def test_each_variable_is_parsed(variable: str, raw: str, field: str, expected: Any) -> None:
    """Each RELAY_* value lands, parsed, in its setting; fractional seconds are allowed."""
    settings = Settings.from_env({variable: raw})
    assert getattr(settings, field) == expected


@pytest.mark.parametrize("variable", ["RELAY_PORT", "RELAY_POLL_MIN_INTERVAL", "RELAY_HOST"])
def test_an_empty_value_means_the_default(variable: str) -> None:
    """A variable set to nothing (or blanks) is the same as not set."""
    assert Settings.from_env({variable: "  "}) == Settings()


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("RELAY_DATABASE_URL", "mysql://x"),
        ("RELAY_DATABASE_URL", "relay.db"),
        ("RELAY_PORT", "99999"),
        ("RELAY_PORT", "-1"),
        ("RELAY_PORT", "http"),
        ("RELAY_PORT", "80.5"),
        ("RELAY_UPSTREAM_URL", "ftp://upstream"),
        ("RELAY_UPSTREAM_URL", "open.skills.video/api"),
        ("RELAY_UPSTREAM_TIMEOUT", "0"),
        ("RELAY_UPSTREAM_TIMEOUT", "abc"),
        ("RELAY_UPSTREAM_MAX_RPS", "0"),
        ("RELAY_UPSTREAM_MAX_RPS", "-5"),
        ("RELAY_POLL_MIN_INTERVAL", "abc"),
        ("RELAY_POLL_MIN_INTERVAL", "-1"),
        ("RELAY_POLL_MIN_INTERVAL", "nan"),
        ("RELAY_POLL_MIN_INTERVAL", "inf"),
        ("RELAY_POLL_MAX_INTERVAL", "1"),  # below the default minimum of 2
        ("RELAY_GENERATION_TTL", "0"),
        ("RELAY_NOT_FOUND_GRACE", "ten minutes"),
        ("RELAY_DELIVERY_TIMEOUT", "-0.1"),
        ("RELAY_DELIVERY_RETRY_SCHEDULE", "1,x"),
        ("RELAY_DELIVERY_RETRY_SCHEDULE", "1,,2"),
        ("RELAY_DELIVERY_RETRY_SCHEDULE", "5,-1"),
        ("RELAY_ALLOW_PRIVATE_CALLBACKS", "maybe"),
        ("RELAY_RATE_LIMIT", "-1"),
        ("RELAY_RATE_LIMIT", "lots"),
        ("RELAY_ADMIN_TOKEN", "too-short"),
        ("RELAY_ADMIN_TOKEN", "sixteen chars with spaces"),
        ("RELAY_LOG_FORMAT", "xml"),
        ("RELAY_ACCESS_LOG", "sometimes"),
        ("RELAY_PROXY_MAX_BODY", "0"),
        ("RELAY_PROXY_MAX_BODY", "100MiB"),
        ("RELAY_UPSTREAM_SSE", "sometimes"),
        ("RELAY_FAILPOINT", "proxy.somewhere"),
    ],
)
def test_a_bad_value_raises_config_error_naming_the_variable(variable: str, raw: str) -> None:
    """A bad value raises ConfigError whose one-line message starts with the variable."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: raw})
    assert caught.value.name == variable
    message = str(caught.value)
    assert message.startswith(f"{variable}: ")
    assert "\n" not in message
    assert caught.value.why


def test_min_above_max_poll_interval_is_refused() -> None:
    """RELAY_POLL_MAX_INTERVAL below RELAY_POLL_MIN_INTERVAL is a ConfigError naming it."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"RELAY_POLL_MIN_INTERVAL": "5", "RELAY_POLL_MAX_INTERVAL": "4"})
    assert caught.value.name == "RELAY_POLL_MAX_INTERVAL"
    assert Settings.from_env({"RELAY_POLL_MIN_INTERVAL": "0.2", "RELAY_POLL_MAX_INTERVAL": "0.2"})


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("RELAY_DATABASE_URL", f"mysql://relay:{SECRET}@db.internal/relay"),
        ("RELAY_DATABASE_URL", f"postgres:/{SECRET}"),
    ],
)
def test_a_refused_value_with_a_secret_is_not_echoed(variable: str, raw: str) -> None:
    """The message about a refused value that may hold a password does not repeat it."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: raw, "RELAY_UPSTREAM_API_KEY": SECRET})
    assert caught.value.name == variable
    assert SECRET not in str(caught.value)


def test_the_upstream_key_is_never_echoed() -> None:
    """Neither a ConfigError nor the settings' repr shows RELAY_UPSTREAM_API_KEY."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"RELAY_UPSTREAM_API_KEY": SECRET, "RELAY_PORT": "nope"})
    assert SECRET not in str(caught.value)
    settings = Settings.from_env({"RELAY_UPSTREAM_API_KEY": SECRET})
    assert settings.upstream_api_key == SECRET
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)


def test_the_admin_token_is_never_echoed() -> None:
    """A refused RELAY_ADMIN_TOKEN is not repeated, and the settings' repr hides a good one."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"RELAY_ADMIN_TOKEN": "short-secret"})
    assert "short-secret" not in str(caught.value)
    assert SECRET not in repr(Settings.from_env({"RELAY_ADMIN_TOKEN": SECRET}))
