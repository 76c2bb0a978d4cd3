"""The upstream's status words (pure): their one spelling, which are final, how far along.

The poll API answers IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED or CANCELED; older answers used
another vocabulary, and statuses are read case-insensitively (SUCCEEDED is COMPLETED,
CANCELLED is CANCELED). An unknown status is not final. Push hints and the running list say
the same things in these words, and hints arrive out of order, so every status has a rank: a
generation never moves back to a lower one on a hint's word.
"""

from __future__ import annotations

FINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELED"})
_ALIASES = {
    "SUCCEEDED": "COMPLETED",
    "SUCCESS": "COMPLETED",
    "CANCELLED": "CANCELED",
    "STARTING": "IN_QUEUE",
    "QUEUED": "IN_QUEUE",
    "PROCESSING": "IN_PROGRESS",
}
_RANKS = {"IN_QUEUE": 1, "IN_PROGRESS": 2}
TERMINAL_RANK = 3


def normalize_status(raw: str) -> str:
    """The canonical upper-case status for any spelling upstream has used."""
    status = raw.strip().upper().replace("-", "_").replace(" ", "_")
    # Stored in a 32-character column; an unknown status longer than that is still unknown.
    return _ALIASES.get(status, status).replace("\x00", "")[:32]


def status_rank(status: str | None) -> int:
    """How far along a status is: unknown 0, queued 1, running 2, any final status 3."""
    if status is None:
        return 0
    if status in FINAL_STATUSES:
        return TERMINAL_RANK
    return _RANKS.get(status, 0)


def furthest(current: str | None, named: str | None) -> str | None:
    """The further along of two statuses (the current one on a tie)."""
    return named if status_rank(named) > status_rank(current) else current
