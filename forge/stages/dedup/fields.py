"""What a row is compared on (`dedup.field`): the text a dedup step hashes, from any row shape
forge writes or reads — curated rows (`messages` or `text`), generation rows (`messages` +
`text`), plain text — so the same prompt found in three datasets is one prompt."""

from __future__ import annotations

import json
from typing import Any

from forge.stages.dedup.minhash import normalize

FIELDS = ("text", "messages", "messages.user", "messages.assistant", "prompt")


class FieldError(ValueError):
    """dedup.field names something this row does not have."""


def _messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    value = row.get("messages")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    return [m for m in value or [] if isinstance(m, dict)]


def _turns(row: dict[str, Any], roles: tuple[str, ...] | None) -> str:
    parts = []
    for m in _messages(row):
        if roles is None or m.get("role") in roles:
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            # the role is part of the text only when several roles are compared (not whitespace:
            # normalize() collapses every kind of it)
            parts.append(f"<{m.get('role')}> {content or ''}" if roles is None else str(content or ""))
    return " <turn> ".join(parts)


def field_text(row: dict[str, Any], field: str) -> str:
    """The normalized text of `field` in `row` (see FIELDS). `text` of a chat row without a text
    column is its whole conversation; a generation row's `text` is its answer."""
    if field == "messages":
        body = _turns(row, None)
    elif field == "messages.user":
        body = _turns(row, ("user",))
    elif field == "messages.assistant":
        body = _turns(row, ("assistant",)) or str(row.get("text") or "")
    elif field == "text":
        body = row["text"] if isinstance(row.get("text"), str) else _turns(row, None)
    elif field in row:
        value = row[field]
        body = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    else:
        raise FieldError(f"dedup.field: the row has no {field!r} (fields: {', '.join(FIELDS)} or a column)")
    return normalize(body)
