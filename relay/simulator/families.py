"""Model families and the vocabulary of upstream's statuses: what a generation of each family
looks like (durations, inputs, credits, failure codes) and how a model path names its family.

Pure data and one pure function; it must not hold state or draw random numbers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final, Literal

Family = Literal["video", "image", "speech"]
FinalStatus = Literal["COMPLETED", "FAILED", "CANCELED"]

STATUSES: Final = ("IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELED")
FINAL_STATUSES: Final[tuple[FinalStatus, ...]] = ("COMPLETED", "FAILED", "CANCELED")
FAMILIES: Final[tuple[Family, ...]] = ("video", "image", "speech")
LEGACY_STATUS: Final[Mapping[str, str]] = {
    "IN_QUEUE": "starting",
    "IN_PROGRESS": "processing",
    "COMPLETED": "succeeded",
    "FAILED": "failed",
    "CANCELED": "canceled",
}

# (queue range, run range) in seconds before time_scale, per family; the totals match the
# ranges upstream.md gives: speech 3-11 s, images 5-30 s, video 60-300 s.
FAMILY_DURATIONS_S: Final[Mapping[Family, tuple[tuple[float, float], tuple[float, float]]]] = {
    "speech": ((0.0, 1.0), (3.0, 10.0)),
    "image": ((0.0, 2.0), (5.0, 28.0)),
    "video": ((0.0, 10.0), (60.0, 290.0)),
}
_VIDEO_WORDS: Final = frozenset(
    [
        "sora",
        "veo",
        "kling",
        "video",
        "seedance",
        "runway",
        "wan",
        "luma",
        "vidu",
        "hailuo",
        "ltx",
        "pixverse",
        "lipsync",
        "upscale",
        "pika",
        "hunyuan",
    ]
)
_SPEECH_WORDS: Final = frozenset(["speech", "tts", "audio", "voice", "elevenlabs", "eleven"])
CODE_PREFIX: Final[Mapping[Family, str]] = {"video": "VIDEO", "image": "IMAGE", "speech": "TTS"}
FAILURES: Final = (
    ("FAILED", "The generation failed."),
    ("TIMEOUT", "The generation timed out."),
    ("PROVIDER_UNAVAILABLE", "The model provider is unavailable."),
    ("CONTENT_REJECTED", "The input was rejected by the content policy."),
)
CREDITS: Final[Mapping[Family, int]] = {"video": 200, "image": 20, "speech": 5}
# Shared by every generation created without an input: never mutated.
DEFAULT_INPUT: Final[Mapping[Family, dict[str, Any]]] = {
    "video": {"prompt": "a cat surfing a wave", "duration": 5, "aspect_ratio": "16:9"},
    "image": {"prompt": "a cat", "aspect_ratio": "1:1", "resolution": "1024x1024", "n": 1},
    "speech": {"text": "Hello from the simulator.", "voice": "default"},
}


def family_for_model(model_path: str) -> Family:
    """Guess the model family from `provider/model...`: video, then speech, else image."""
    words = set(re.findall(r"[a-z]+", model_path.lower()))
    if words & _VIDEO_WORDS:
        return "video"
    if words & _SPEECH_WORDS:
        return "speech"
    return "image"
