"""One generation of the simulator: its scripted lifecycle and the bodies upstream would send.

A generation moves IN_QUEUE -> IN_PROGRESS -> its final status at fixed monotonic times; its
phase is computed from the clock when asked (nothing ticks). Bodies are built per phase and
serialised once (`answer`), because polls are the simulator's hot path.

It must not draw random numbers, know about HTTP requests, or reach other generations.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

import orjson

from relay.simulator.answers import Answer, answer
from relay.simulator.config import FaultSettings
from relay.simulator.families import CREDITS, LEGACY_STATUS, STATUSES, Family, FinalStatus

SIMULATOR_NAME: Final = "relay.simulator"
QUEUED, RUNNING, FINAL = 0, 1, 2  # phases


@dataclass(slots=True, eq=False)
class Generation:
    """One scripted generation. Times are time.monotonic() unless the name says `wall`."""

    id: str
    family: Family
    model: str
    input: dict[str, Any]
    created_mono: float
    wall_offset_s: float  # time.time() - time.monotonic() at creation
    started_mono: float  # IN_PROGRESS from here
    final_mono: float  # final_status from here
    final_status: FinalStatus
    legacy_status: bool = False
    not_found_until_mono: float = -math.inf
    fault_overrides: dict[str, Any] | None = None
    code: str | None = None  # used when FAILED
    message: str | None = None
    answers: list[Answer | None] = field(default_factory=lambda: [None, None, None])
    faults_cache: FaultSettings | None = None
    faults_cache_version: int = -1
    other_workspace: bool = False  # readable by id; never listed, sends no webhooks
    check_due: float = math.inf  # the phase check booked in the Timers heap (PhaseWatch)
    hooked_phase: int = -1  # the last phase whose webhook event was emitted
    watchers: list[asyncio.Future[None]] | None = None  # SSE streams waiting for a change

    def phase_at(self, now_mono: float) -> int:
        """QUEUED (0), RUNNING (1) or FINAL (2) at `now_mono`."""
        if now_mono >= self.final_mono:
            return FINAL
        return RUNNING if now_mono >= self.started_mono else QUEUED

    def status_at(self, now_mono: float) -> str:
        """The canonical (upper-case) status at `now_mono`."""
        return self.status_of(self.phase_at(now_mono))

    def status_of(self, phase: int) -> str:
        return self.final_status if phase == FINAL else STATUSES[phase]

    @property
    def final_at(self) -> float:
        """Unix time at which the generation is (or will be) final."""
        return self.final_mono + self.wall_offset_s

    @property
    def started_at(self) -> float:
        return self.started_mono + self.wall_offset_s

    def body(self, phase: int) -> dict[str, Any]:
        """The result object upstream would send in `phase`."""
        status = self.status_of(phase)
        body: dict[str, Any] = {
            "id": self.id,
            "status": LEGACY_STATUS[status] if self.legacy_status else status,
            "input": self.input,
            "data": self._data() if status == "COMPLETED" else None,
            "usage": self.usage(status),
        }
        if status == "FAILED":
            body["code"] = self.code
            body["message"] = self.message
        if phase == FINAL:
            body["provider_meta"] = {
                "simulator": SIMULATOR_NAME,
                "family": self.family,
                "model": self.model,
                "final_at": self.final_at,
            }
        return body

    def answer(self, phase: int) -> Answer:
        cached = self.answers[phase]
        if cached is None:
            # orjson's bytes keep their 4 KiB working buffer; a right-sized copy is what lets
            # 100,000 cached generations fit in tens of MB instead of hundreds.
            body = memoryview(orjson.dumps(self.body(phase))).tobytes()
            cached = self.answers[phase] = answer(200, body)
        return cached

    def usage(self, status: str) -> dict[str, int]:
        total = 0
        if status == "COMPLETED":
            total = CREDITS[self.family] * (self._image_count() if self.family == "image" else 1)
        return {"total": total, "subscription": total, "permanent": 0}

    def _image_count(self) -> int:
        n = self.input.get("n")
        return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 10 else 1

    def _data(self) -> dict[str, Any]:
        base = f"https://cdn.example.com/output/{quote(self.id, safe='')}"
        if self.family == "image":
            width, height = 1024, 1024
            resolution = self.input.get("resolution")
            if isinstance(resolution, str):
                match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", resolution)
                if match:
                    width, height = int(match[1]), int(match[2])
            images = [
                {
                    "url": f"{base}-{i}.png",
                    "file_name": f"{self.id}-{i}.png",
                    "content_type": "image/png",
                    "width": width,
                    "height": height,
                }
                for i in range(self._image_count())
            ]
            prompt = self.input.get("prompt")
            return {
                "type": "image",
                "n": len(images),
                "actual_prompt": prompt if isinstance(prompt, str) else "",
                "images": images,
                "image": images[0],
            }
        if self.family == "video":
            return {
                "type": "video",
                "video": {
                    "url": f"{base}.mp4",
                    "file_name": f"{self.id}.mp4",
                    "content_type": "video/mp4",
                    "width": 1280,
                    "height": 720,
                    "duration": 5.0,
                },
            }
        return {
            "type": "audio",
            "audio": {
                "url": f"{base}.mp3",
                "file_name": f"{self.id}.mp3",
                "content_type": "audio/mpeg",
                "duration": 4.2,
            },
        }
