"""What every config schema shares: the error a check raises, and the mark of a knob that changes
how fast or how visibly a step runs but never what it writes (a recipe step's fingerprint leaves
it out, forge/recipe/fingerprint.py). Its own module, imported by the root schema and by every
stage's schema alike, so that a stage's config never imports the root config (no import circle)."""

from __future__ import annotations

import dataclasses
from typing import Any


class ConfigError(ValueError):
    """A config value that composes but cannot work; the message starts with the key."""


NEUTRAL = "neutral"  # dataclass field metadata key: True on a knob that never changes results


def neutral(default: Any = None, factory: Any = None) -> Any:
    """A dataclass field that does not change what a step writes (progress, workers, in-flight
    limits, timeouts of the machinery): changing it re-runs nothing in a recipe."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={NEUTRAL: True})
    return dataclasses.field(default=default, metadata={NEUTRAL: True})
