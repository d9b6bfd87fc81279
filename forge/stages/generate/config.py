"""The generate stage's groups: `prompt:` (how a row becomes chat messages, prompt.py beside this
file) and `generation:` (sampling parameters sent with every request); `rollout:` is rollout/config.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Overlong(str, Enum):
    truncate = "truncate"  # cut the document part until the prompt fits
    skip = "skip"  # quarantine the row with its length


@dataclass
class PromptConfig:
    """How a row becomes chat messages.

    Attributes:
        template: text containing [[DOCUMENT]] (or a path to a file holding it); null = the
            prompt column is the user message as is.
        system: system prompt prepended to every conversation; null = none.
        on_overlong: `truncate` the document part, or `skip` (quarantine) rows whose prompt does
            not fit in max_model_len - max_tokens.
    """

    template: str | None = None
    system: str | None = None
    on_overlong: Overlong = Overlong.truncate


@dataclass
class GenerationConfig:
    """Sampling parameters sent with every request; null = the engine's default.

    Attributes:
        rollouts: independent samples per document, the `rollout` column (each gets its own seed
            when `seed` is set); each sample runs the `rollout:` group's function.
        extra_body: extra JSON fields sent as they are (e.g. chat_template_kwargs).
        json_schema: a JSON Schema (a .json file, or inline) every answer must match: guided
            decoding on vLLM and SGLang, `response_format` on endpoints; every answer is parsed and
            validated, its fields become columns (forge/stages/generate/rollout/structured.py).
        json_retries: answers that fail the schema are asked again this many times, then the row
            goes to rejected/ with the raw text and the validation error.
    """

    max_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    rollouts: int = 1
    extra_body: dict[str, Any] = field(default_factory=dict)
    json_schema: Any = None
    json_retries: int = 2
