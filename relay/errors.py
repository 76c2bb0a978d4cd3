"""The relay's exception tree, drawn once: every exception the relay defines on purpose.

    RelayError                        root of what stops a relay process (relay/errors.py)
    ├── ConfigError                   a RELAY_* variable or CLI argument is wrong (exit code 2)
    └── StartupError                  the process cannot start (e.g. the SQLite file is in use)

Outside that tree on purpose, each defined beside the code that owns it and built on the
standard exception its callers already handle:

    ValueError
    └── addresses.CallbackURLError    a client's callback URL is malformed or refused (422)
    OSError
    └── addresses.BlockedAddressError a delivery's connection refused: its address is blocked
                                      (aiohttp reports it as a failed connection)
    Exception
    ├── http.ApiError                 an HTTP API error, answered as a JSON error body
    └── store.RedeliverConflict       nothing to redeliver (the API answers 409)

The upstream simulator's, for its control API (relay/simulator/errors.py):

    ValueError
    └── InvalidSpec                   a generation spec or fault setting is refused (400)
        └── Conflict                  the request contradicts the current state (409)
            ├── DuplicateId           a generation with this id exists already
            └── AlreadyFinal          finish() with another final status than it ended with
    KeyError
    └── UnknownGeneration             no generation has this id (404)
    Exception
    └── ControlError                  any other refusal of the control API (its own status)
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
