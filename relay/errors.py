"""The relay's exception tree, drawn once.

    RelayError                   root of everything the relay raises on purpose
    ├── ConfigError              a RELAY_* variable or CLI argument is wrong (exit code 2)
    └── StartupError             the process cannot start (e.g. the SQLite file is in use)

Outside this tree on purpose: `addresses.CallbackURLError` is a ValueError (a client's bad
input, answered 422), and the HTTP API's errors are `http.ApiError`, answered as JSON bodies.
"""

from __future__ import annotations


class RelayError(Exception):
    """Root of the relay's own errors."""


class ConfigError(RelayError):
    """A configuration value is invalid; the message names the variable and why."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name}: {why}")
        self.name = name
        self.why = why


class StartupError(RelayError):
    """The process cannot start; the message is one line for the operator."""
