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
- the running list, newest first, without generations "of another workspace" (a spec's
  `"workspace": "other"`: readable by id, never listed), or missing altogether
  (`running_list_status` 404/405/501 in the faults);
- signed workspace webhooks (`task.created`, `task.started`, `task.completed`, `task.failed`,
  `task.canceled`, Standard Webhooks headers, several secrets) to a configured URL, with
  seeded loss, duplicates, delay and jitter, bad signatures, an event filter and a
  selectable place for the generation id (`webhook_settings` lists the knobs);
- creates, plain or answered as an SSE stream of status frames, JSON or multipart bodies
  streamed (never held whole) and logged byte-exact (count, sha256); refusals (402, 422,
  429, 500), create latency, answers without an id, late answers to creates already made,
  and SSE streams cut after N frames or seconds (all in the faults);
- counters: every poll of every id (known or not) with its wall-clock time, list calls and
  creates apart, readable under `/_fake/` so tests can count what relay did.

It must not import relay modules outside `relay.simulator`, touch a database, or read the
environment other than through `FakeUpstreamConfig.from_env(environ)`.

Rooms: `config` (settings and their validation), `families` (model families, status words),
`model` (one generation: lifecycle and bodies), `specs` (generation specs), `answers`
(prepared HTTP answers), `state` (FakeUpstream: generations, counters, create/finish),
`polls` (polls and request faults), `running` (the running list), `timers` (the one timer heap), `watch` (phase
changes as they happen), `webhook_settings` and `webhooks` (the workspace webhooks), `creates` (the upstream's create routes),
`control` (the /_fake/ API and its JSON shapes), `app` (wiring), `runner` (uvicorn).

HTTP surface (JSON shapes of the control API in `relay.simulator.control`):

    GET  /v1/generation/{id}                    poll (bearer checked, faults applied)
    GET  /v1/generations/running?limit=N        queued and running, newest first (same checks)
    POST /v1/generation/{provider}/{model...}   create from a model path (bearer checked)
    POST /v1/generation/sse/{provider}/{model...}  the same, answered as text/event-stream
    POST /_fake/generations                     create a scripted generation
    POST /_fake/generations/bulk                create many
    POST /_fake/generations/{id}/finish         make it final now
    GET  /_fake/generations/{id}/polls          poll count and times of one id
    GET  /_fake/stats                           totals
    GET  /_fake/creates                         every create as it arrived
    GET  /_fake/lists                           how many running-list calls, and when
    POST /_fake/reset                           clear counters (optionally generations, faults, webhooks)
    GET  /_fake/faults, PUT /_fake/faults       global fault settings
    GET  /_fake/webhooks, PUT /_fake/webhooks   webhook settings ("url": null turns them off)
"""

from __future__ import annotations

from relay.simulator.app import create_fake_upstream
from relay.simulator.config import AuthMode, FakeUpstreamConfig, FaultSettings
from relay.simulator.errors import (
    AlreadyFinal,
    Conflict,
    ControlError,
    DuplicateId,
    InvalidSpec,
    UnknownGeneration,
)
from relay.simulator.families import (
    FAMILIES,
    FAMILY_DURATIONS_S,
    FINAL_STATUSES,
    LEGACY_STATUS,
    STATUSES,
    Family,
    FinalStatus,
    family_for_model,
)
from relay.simulator.model import Generation
from relay.simulator.polls import POLL_PREFIX
from relay.simulator.runner import run_fake_upstream
from relay.simulator.state import FakeUpstream

__all__ = [
    "FAMILIES",
    "FAMILY_DURATIONS_S",
    "FINAL_STATUSES",
    "LEGACY_STATUS",
    "POLL_PREFIX",
    "STATUSES",
    "AlreadyFinal",
    "AuthMode",
    "Conflict",
    "ControlError",
    "DuplicateId",
    "FakeUpstream",
    "FakeUpstreamConfig",
    "Family",
    "FaultSettings",
    "FinalStatus",
    "Generation",
    "InvalidSpec",
    "UnknownGeneration",
    "create_fake_upstream",
    "family_for_model",
    "run_fake_upstream",
]
