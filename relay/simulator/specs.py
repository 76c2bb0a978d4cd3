"""Generation specs: the JSON objects (and add_generation's arguments) that script a generation,
and their validation.

It must not create anything or draw random numbers: `FakeUpstream` turns a checked spec into
a Generation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from relay.simulator.config import FaultSettings, check_number
from relay.simulator.errors import InvalidSpec
from relay.simulator.families import FAMILIES, FINAL_STATUSES

SPEC_KEYS: Final = frozenset(
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
        "workspace",
    ]
)
WORKSPACES: Final = ("own", "other")


def check_spec(raw: object) -> dict[str, Any]:
    """Validate one spec (JSON object or add_generation's arguments); None means absent."""
    if not isinstance(raw, Mapping):
        raise InvalidSpec("a generation spec must be a JSON object")
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise InvalidSpec(f"unknown keys {sorted(unknown)}; known: {sorted(SPEC_KEYS)}")
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
            spec[key] = check_number(key, spec[key])
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
    if spec.get("workspace", "own") not in WORKSPACES:
        raise InvalidSpec(f"workspace must be one of {list(WORKSPACES)}")
    for key in ("code", "message"):
        if key in spec and not isinstance(spec[key], str):
            raise InvalidSpec(f"{key} must be a string")
    return spec
