"""FakeUpstream: the simulator's state (generations, faults, counters) and the operations on
it (create, finish, reset), usable in-process as well as over HTTP (`.app`).

It owns the seeded random streams and every counter. It must not parse HTTP requests (the
app's handlers do) nor read the environment. State lives in one process and is not
thread-safe: mutate it from the event loop that serves it (or over HTTP).
"""

from __future__ import annotations

import array
import asyncio
import dataclasses
import random
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from relay.simulator.config import FakeUpstreamConfig, FaultSettings
from relay.simulator.errors import AlreadyFinal, DuplicateId, InvalidSpec, UnknownGeneration
from relay.simulator.families import (
    CODE_PREFIX,
    DEFAULT_INPUT,
    FAILURES,
    FAMILY_DURATIONS_S,
    FINAL_STATUSES,
    STATUSES,
    Family,
    FinalStatus,
)
from relay.simulator.model import FINAL, Generation
from relay.simulator.polls import BearerCheck
from relay.simulator.running import RunningIndex
from relay.simulator.specs import check_spec
from relay.simulator.timers import Timers
from relay.simulator.watch import PhaseWatch
from relay.simulator.webhook_settings import WebhookSettings
from relay.simulator.webhooks import WebhookEmitter

if TYPE_CHECKING:
    from relay.simulator.creates import CreateRecord


def _by_code(counts: dict[int, int]) -> dict[str, int]:
    return {str(code): n for code, n in sorted(counts.items())}


class FakeUpstream:
    """The simulator's state and its Starlette app (`.app`); see the package docstring for the
    HTTP surface and `relay.simulator.control` for the control API's JSON shapes."""

    def __init__(self, config: FakeUpstreamConfig | None = None) -> None:
        from relay.simulator.app import build_app  # the app's handlers need this class

        self.config = config or FakeUpstreamConfig()
        self.faults = dataclasses.replace(self.config.faults)
        self.faults_version = 0
        self.generations: dict[str, Generation] = {}
        self.running = RunningIndex()
        self.timers = Timers()  # started and stopped by the app's lifespan
        self.webhooks = WebhookEmitter(self.timers, self.config.seed)
        self.watch = PhaseWatch(self.timers, self.webhooks)
        # Separate streams so that, e.g., turning faults on does not change the ids drawn.
        self._id_rng = random.Random(f"{self.config.seed}:ids")
        self._lifecycle_rng = random.Random(f"{self.config.seed}:lifecycle")
        self.fault_rng = random.Random(f"{self.config.seed}:faults")
        self.bearer = BearerCheck(self.config.api_key)
        self.hangs_released = asyncio.Event()
        self._reset_counters()
        self.app = build_app(self)

    # -- counters ------------------------------------------------------------------------------

    def _reset_counters(self) -> None:
        self._poll_times: dict[str, array.array[float]] = {}
        self.poll_total = 0
        self.unknown_id_polls = 0
        self.by_status_code: dict[int, int] = {}
        self.list_total = 0  # GET /v1/generations/running calls, apart from polls
        self.list_times: array.array[float] = array.array("d")  # their wall-clock times
        self.lists_in_flight = 0
        self.lists_in_flight_max = 0
        self.list_by_status_code: dict[int, int] = {}
        self.creates: list[CreateRecord] = []  # every create that passed the auth check
        self.fault_counts = {"hang": 0, "error": 0, "rate_limit": 0, "malformed": 0}

    def record_poll(self, gen_id: str) -> Generation | None:
        """Count a poll of `gen_id` (known or not) with its time; return the generation."""
        times = self._poll_times.get(gen_id)
        if times is None:
            times = self._poll_times[gen_id] = array.array("d")
        times.append(time.time())
        self.poll_total += 1
        gen = self.generations.get(gen_id)
        if gen is None:
            self.unknown_id_polls += 1
        return gen

    def poll_count(self, gen_id: str) -> int:
        times = self._poll_times.get(gen_id)
        return 0 if times is None else len(times)

    def poll_times(self, gen_id: str) -> list[float]:
        """Unix times at which `gen_id` was polled, oldest first (faulted polls included)."""
        times = self._poll_times.get(gen_id)
        return [] if times is None else times.tolist()

    def polls_json(self, gen_id: str) -> dict[str, Any]:
        gen = self.generations.get(gen_id)
        return {
            "id": gen_id,
            "count": self.poll_count(gen_id),
            "times": self.poll_times(gen_id),
            "status": None if gen is None else gen.status_at(time.monotonic()),
            "final_at": None if gen is None else gen.final_at,
            "final_hint_at": self.webhooks.final_delivered_at.get(gen_id),
        }

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        by_status = dict.fromkeys(STATUSES, 0)
        for gen in self.generations.values():
            by_status[gen.status_at(now)] += 1
        return {
            "polls": self.poll_total,
            "unknown_id_polls": self.unknown_id_polls,
            "by_status_code": _by_code(self.by_status_code),
            "list_total": self.list_total,
            "lists_in_flight_max": self.lists_in_flight_max,
            "list_by_status_code": _by_code(self.list_by_status_code),
            "create_total": len(self.creates),
            "faults": dict(self.fault_counts),
            "webhooks": self.webhooks.stats(),
            "timers": len(self.timers),
            "generations": {"total": len(self.generations), **by_status},
        }

    def reset(
        self, *, generations: bool = False, faults: bool = False, webhooks: bool = False
    ) -> None:
        """Clear counters and stats; release hung polls; optionally drop every generation
        (ending their SSE streams and every pending timer), restore the configured faults,
        or turn webhooks off."""
        self._reset_counters()
        self.webhooks.reset_counters()
        self.release_hangs()
        if generations:
            self.watch.release_all(list(self.generations.values()))
            self.timers.clear()
            self.generations.clear()
            self.running.clear()
        if faults:
            self.set_faults(self.config.faults)
        if webhooks:
            self.webhooks.configure(WebhookSettings())

    def release_hangs(self) -> None:
        """Let every poll held by a hang fault answer now."""
        self.hangs_released.set()
        self.hangs_released = asyncio.Event()

    # -- webhooks ------------------------------------------------------------------------------

    def update_webhooks(self, changes: Mapping[str, Any]) -> WebhookSettings:
        """Apply a partial mapping (the JSON of PUT /_fake/webhooks); raises InvalidSpec.

        Turning them on books the next phase change of every own-workspace generation that
        is not final yet; phases already reached send nothing.
        """
        was_on = self.webhooks.on
        self.webhooks.configure(self.webhooks.settings.merged(changes))
        if self.webhooks.on and not was_on:
            now = time.monotonic()
            for gen in self.generations.values():
                if self.webhooks.wants(gen):
                    gen.hooked_phase = gen.phase_at(now)
                    self.watch.track(gen, now)
        return self.webhooks.settings

    # -- faults --------------------------------------------------------------------------------

    def set_faults(self, faults: FaultSettings) -> None:
        self.faults = dataclasses.replace(faults)
        self.faults_version += 1

    def update_faults(self, changes: Mapping[str, Any]) -> FaultSettings:
        """Apply a partial mapping (the JSON of PUT /_fake/faults); raises InvalidSpec."""
        self.set_faults(self.faults.merged(changes))
        return self.faults

    def faults_for(self, gen: Generation | None) -> FaultSettings:
        """The settings that apply to polls of `gen`: global, or its overrides on top."""
        if gen is None or gen.fault_overrides is None:
            return self.faults
        if gen.faults_cache is None or gen.faults_cache_version != self.faults_version:
            gen.faults_cache = dataclasses.replace(self.faults, **gen.fault_overrides)
            gen.faults_cache_version = self.faults_version
        return gen.faults_cache

    # -- creating and finishing ----------------------------------------------------------------

    def _new_id(self) -> str:
        while True:
            gen_id = f"gen_{self._id_rng.getrandbits(64):016x}"
            if gen_id not in self.generations:
                return gen_id

    def _draw_duration(self, bounds: tuple[float, float]) -> float:
        return self._lifecycle_rng.uniform(*bounds) * self.config.time_scale

    def _draw_outcome(self) -> FinalStatus:
        draw = self._lifecycle_rng.random()
        if draw < self.config.failed_fraction:
            return "FAILED"
        if draw < self.config.failed_fraction + self.config.canceled_fraction:
            return "CANCELED"
        return "COMPLETED"

    def add_generation(
        self,
        family: Family,
        *,
        id: str | None = None,  # the JSON key it mirrors
        queue_s: float | None = None,
        run_s: float | None = None,
        final_at_s: float | None = None,
        final_status: FinalStatus | None = None,
        legacy_status: bool = False,
        not_found_for_s: float = 0.0,
        faults: Mapping[str, Any] | None = None,
        input: Mapping[str, Any] | None = None,  # upstream's field name
        code: str | None = None,
        message: str | None = None,
        model: str | None = None,
        workspace: str = "own",
    ) -> Generation:
        """Create a scripted generation; raises InvalidSpec (DuplicateId) on a bad spec.

        Durations given here are seconds of real time; only drawn ones are scaled by
        `time_scale`. `final_at_s` is a shorthand for "final after this long": the queue takes
        `queue_s` if given, else a fifth of it. `not_found_for_s`: polls answer 404 for this
        long after creation (eventual consistency). `faults` overrides the global settings
        for this id. `code`/`message` are used if it ends FAILED (drawn when omitted).
        `workspace` "other": readable by id, never in the running list, no webhooks.
        """
        arguments = dict(locals())
        del arguments["self"], arguments["model"]
        return self.create_checked([check_spec(arguments)], model=model)[0]

    def create_checked(
        self, specs: list[dict[str, Any]], *, model: str | None = None, bulk: bool = False
    ) -> list[Generation]:
        """Create generations from checked specs, all or none; with `bulk`, a DuplicateId
        names the index of the item (`items[i]: ...`)."""
        seen: set[str] = set()
        for index, spec in enumerate(specs):
            gen_id = spec.get("id")
            if gen_id is not None:
                if gen_id in self.generations or gen_id in seen:
                    where = f"items[{index}]: " if bulk else ""
                    raise DuplicateId(f"{where}generation {gen_id!r} exists already")
                seen.add(gen_id)
        return [self._create(spec, model=model) for spec in specs]

    def _create(self, spec: Mapping[str, Any], *, model: str | None = None) -> Generation:
        family: Family = spec["family"]
        queue_bounds, run_bounds = FAMILY_DURATIONS_S[family]
        if "final_at_s" in spec:
            final_at_s: float = spec["final_at_s"]
            queue_s = spec.get("queue_s", final_at_s / 5)
            run_s = final_at_s - queue_s
        else:
            queue_s = spec.get("queue_s")
            if queue_s is None:
                queue_s = self._draw_duration(queue_bounds)
            run_s = spec.get("run_s")
            if run_s is None:
                run_s = self._draw_duration(run_bounds)
        final_status: FinalStatus = spec.get("final_status") or self._draw_outcome()
        code, message = spec.get("code"), spec.get("message")
        if final_status == "FAILED" and (code is None or message is None):
            reason, text = FAILURES[self._lifecycle_rng.randrange(len(FAILURES))]
            code = code or f"{CODE_PREFIX[family]}_GENERATION_{reason}"
            message = message or text
        gen_id: str = spec.get("id") or self._new_id()
        now = time.monotonic()
        gen = Generation(
            id=gen_id,
            family=family,
            model=model or f"fake/{family}",
            input=dict(spec["input"]) if spec.get("input") else DEFAULT_INPUT[family],
            created_mono=now,
            wall_offset_s=time.time() - now,
            started_mono=now + queue_s,
            final_mono=now + queue_s + run_s,
            final_status=final_status,
            legacy_status=spec.get("legacy_status", False),
            not_found_until_mono=now + spec.get("not_found_for_s", 0.0),
            fault_overrides=spec.get("faults") or None,
            code=code,
            message=message,
            other_workspace=spec.get("workspace") == "other",
        )
        self.generations[gen_id] = gen
        self.running.add(gen)
        if self.webhooks.wants(gen):
            self.webhooks.reached(gen, gen.phase_at(now))
            self.watch.track(gen, now)
        return gen

    def finish(self, gen_id: str, status: FinalStatus | None = None) -> Generation:
        """Make `gen_id` final now (with `status`, default its scripted one).

        Idempotent if it is already final with that status; raises UnknownGeneration, or
        AlreadyFinal if it is already final with another status.
        """
        gen = self.generations.get(gen_id)
        if gen is None:
            raise UnknownGeneration(gen_id)
        if status is not None and status not in FINAL_STATUSES:
            raise InvalidSpec(f"status must be one of {list(FINAL_STATUSES)}")
        now = time.monotonic()
        if gen.phase_at(now) == FINAL:
            if status is not None and status != gen.final_status:
                raise AlreadyFinal(f"{gen_id} is already final as {gen.final_status}")
            return gen
        if status is not None and status != gen.final_status:
            gen.final_status = status
            if status == "FAILED" and (gen.code is None or gen.message is None):
                gen.code = f"{CODE_PREFIX[gen.family]}_GENERATION_FAILED"
                gen.message = "The generation failed."
        gen.final_mono = now
        gen.started_mono = min(gen.started_mono, now)
        gen.not_found_until_mono = min(gen.not_found_until_mono, now)
        gen.answers[FINAL] = None  # the final body carries the final time
        self.watch.changed(gen)
        return gen
