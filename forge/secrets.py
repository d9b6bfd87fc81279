"""Keeping secrets out of logs, dumped configs and cards.

Values of secret-looking keys are masked; token-shaped strings (hf_..., sk-...) and the live
values of known secret env vars are masked wherever they appear, including log records.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

SECRET_KEY = re.compile(r"(^|[_-])(token|secret|password|passwd|api_?key|authorization|credentials?)$", re.I)
SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_\-]{16,}|gh[pousr]_[A-Za-z0-9]{20,})\b")
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY")
MASK = "***"
_extra_env: set[str] = set()
_extra_values: set[str] = set()


def register_secret_env(name: str | None) -> None:
    """Also mask the value of this env var (e.g. the one model.api_key_env names)."""
    if name:
        _extra_env.add(name)


def register_secret_value(value: str | None) -> None:
    """Also mask this value (a token read from a file, e.g. the saved Hugging Face login)."""
    if value:
        _extra_values.add(value)


def _live_values() -> list[str]:
    values = [os.environ.get(n) for n in (*SECRET_ENV, *_extra_env)] + sorted(_extra_values)
    return [v for v in values if v and len(v) >= 6]


def redact_text(text: str) -> str:
    for value in _live_values():
        text = text.replace(value, MASK)
    return SECRET_VALUE.sub(MASK, text)


def redact(obj: Any) -> Any:
    """A copy of a plain dict/list tree with secrets masked."""
    if isinstance(obj, dict):
        return {k: (MASK if SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True
