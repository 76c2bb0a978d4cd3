"""What the simulated workspace webhooks look like: their settings (PUT /_fake/webhooks),
event names, signing (Standard Webhooks) and payload shapes.

Settings, as JSON (every key optional in a PUT; the answer is the merged whole):

    url                 receiver URL; null turns webhooks off (the default)
    secrets             ["whsec_...", ...]: each event is signed with every one (rotation)
    loss_rate           fraction of events never sent
    duplicate_rate      fraction of events sent twice, with the same webhook-id
    delay_s             added to every send
    delay_jitter_s      a uniform extra delay per send (so events can arrive out of order)
    bad_signature_rate  fraction of sends signed with a key nobody has
    events              event types to send (default all five)
    id_location         where the generation id sits: prediction.id, data.prediction.id
                        (default), data.id, id, task_id, data.task_id
    timeout_s           per-POST timeout

Pure: no state, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit

from relay.simulator.config import check_number
from relay.simulator.errors import InvalidSpec

# event type -> prediction.state; the index is the phase (final ones by status).
EVENT_STATES: Final[Mapping[str, str]] = {
    "task.created": "queued",
    "task.started": "running",
    "task.completed": "succeeded",
    "task.failed": "failed",
    "task.canceled": "canceled",
}
FINAL_EVENTS: Final[Mapping[str, str]] = {
    "COMPLETED": "task.completed",
    "FAILED": "task.failed",
    "CANCELED": "task.canceled",
}
WEBHOOK_KEYS: Final = (
    "url",
    "secrets",
    "loss_rate",
    "duplicate_rate",
    "delay_s",
    "delay_jitter_s",
    "bad_signature_rate",
    "events",
    "id_location",
    "timeout_s",
)
ID_LOCATIONS: Final = (
    "prediction.id",
    "data.prediction.id",
    "data.id",
    "id",
    "task_id",
    "data.task_id",
)


def check_secret(secret: object) -> bytes:
    """The key of a `whsec_<base64>` secret; InvalidSpec if it is not one."""
    if not isinstance(secret, str) or not secret.startswith("whsec_"):
        raise InvalidSpec(f"secrets must be whsec_<base64> strings, got {secret!r}")
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        raise InvalidSpec(f"secret {secret[:10]}... is not valid base64") from None
    if not key:
        raise InvalidSpec("a secret must not be empty")
    return key


@dataclass(slots=True)
class WebhookSettings:
    """The workspace's webhook configuration; `url` None means off."""

    url: str | None = None
    secrets: list[str] = field(default_factory=list)
    loss_rate: float = 0.0
    duplicate_rate: float = 0.0
    delay_s: float = 0.0
    delay_jitter_s: float = 0.0
    bad_signature_rate: float = 0.0
    events: list[str] = field(default_factory=lambda: list(EVENT_STATES))
    id_location: str = "data.prediction.id"
    timeout_s: float = 5.0

    def merged(self, changes: object) -> WebhookSettings:
        """A copy with the JSON `changes` applied; InvalidSpec names what is wrong."""
        if not isinstance(changes, Mapping):
            raise InvalidSpec("the body must be a JSON object of webhook settings")
        known = {f.name for f in dataclasses.fields(WebhookSettings)}
        unknown = set(changes) - known
        if unknown:
            raise InvalidSpec(f"unknown webhook settings {sorted(unknown)}; known: {sorted(known)}")
        checked: dict[str, Any] = {}
        for key, value in changes.items():
            if key == "url":
                if value is not None and (
                    not isinstance(value, str) or urlsplit(value).scheme not in ("http", "https")
                ):
                    raise InvalidSpec(f"url must be null or an http(s) URL, got {value!r}")
            elif key == "secrets":
                if not isinstance(value, list):
                    raise InvalidSpec("secrets must be a list of whsec_ strings")
                for secret in value:
                    check_secret(secret)
            elif key == "events":
                if not isinstance(value, list) or set(value) - set(EVENT_STATES):
                    raise InvalidSpec(f"events must be a list drawn from {list(EVENT_STATES)}")
            elif key == "id_location":
                if value not in ID_LOCATIONS:
                    raise InvalidSpec(f"id_location must be one of {list(ID_LOCATIONS)}")
            else:
                maximum = 1.0 if key.endswith("_rate") else 3600.0
                minimum = 0.001 if key == "timeout_s" else 0.0
                value = check_number(key, value, minimum=minimum, maximum=maximum)
            checked[key] = value
        merged = dataclasses.replace(self, **checked)
        if merged.url is not None and not merged.secrets:
            raise InvalidSpec("webhooks need at least one secret to sign with")
        return merged

    def keys(self) -> list[bytes]:
        return [check_secret(secret) for secret in self.secrets]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def signature_header(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "id.timestamp.body">` per key, space-separated."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in keys
    )


def event_payload(
    event: str, msg_id: str, gen_id: str, status: str, model: str, id_location: str
) -> dict[str, Any]:
    """The event's JSON; the generation id is only at `id_location` (the event id, when the
    body carries it, sits where relay's parser looks after that location)."""
    detail = {"state": EVENT_STATES[event], "status": status, "model": model}
    payload: dict[str, Any] = {
        "type": event,
        "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
    }
    if id_location == "prediction.id":
        payload |= {"id": msg_id, "prediction": {"id": gen_id, **detail}}
    elif id_location == "data.prediction.id":
        payload |= {"id": msg_id, "data": {"prediction": {"id": gen_id, **detail}}}
    elif id_location == "data.id":
        payload |= {"id": msg_id, "data": {"id": gen_id, **detail}}
    elif id_location == "id":
        payload |= {"id": gen_id, **detail}
    elif id_location == "task_id":
        payload |= {"task_id": gen_id, **detail}
    else:
        payload |= {"data": {"task_id": gen_id, **detail}}
    return payload
