"""The simulator's exceptions and how the control API reports them.

Owns the error tree of the simulator:

    InvalidSpec (ValueError)        a spec or setting is not acceptable    -> 400
        Conflict                    it contradicts the current state       -> 409
            DuplicateId             a generation with this id exists
            AlreadyFinal            final already, with another status
    UnknownGeneration (KeyError)    no generation has this id              -> 404
    ControlError                    any other control API refusal (status given)

It must not know about HTTP beyond the status codes named here.
"""

from __future__ import annotations


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


class ControlError(Exception):
    """A control API refusal with its own status and error code (e.g. a body that is not JSON)."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
