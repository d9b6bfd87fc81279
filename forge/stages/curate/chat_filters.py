"""Filters on a chat's structure (datatrove has none): role order, turn count, tokens per turn.

They read `row["messages"]` (a list of {role, content, reasoning, tool_calls}); a row without
messages (a document) passes them untouched. Registered in forge/stages/curate/filters.py (FILTERS).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from forge.stages.curate.filters import RowFilter
from forge.stages.curate.rows import ROLES, Removal

_EMPTY_TOOL_CALLS = ("", "[]", "{}", "null")


def has_tool_calls(message: dict[str, Any]) -> bool:
    """tool_calls is JSON text; null, "", "[]", "{}" and "null" mean none."""
    calls = message.get("tool_calls")
    if calls is None:
        return False
    if isinstance(calls, str):
        return calls.strip() not in _EMPTY_TOOL_CALLS
    return bool(calls)


class ChatStructureFilter(RowFilter):
    """A chat the model can learn from: at least one assistant turn, no empty one, roles in order.

    Reasons (value): no_assistant_turn (number of turns); empty_assistant_turn (index of the turn
    whose content and tool_calls are both empty); wrong_role_order ("<index>:<prev>-><role>": a
    system turn other than the first, user and assistant not alternating after it, a tool turn
    not following an assistant turn with tool calls or another tool turn, an assistant turn with
    tool calls not followed by a tool turn, an unknown role); last_turn_not_assistant (the last
    role; only with require_last_assistant: true).
    """

    def __init__(self, require_last_assistant: bool = False) -> None:
        self.require_last_assistant = require_last_assistant

    def check(self, row: dict[str, Any]) -> Removal | None:
        messages = row.get("messages")
        if messages is None:
            return None
        if not any(m.get("role") == "assistant" for m in messages):
            return Removal(self.name, "no_assistant_turn", len(messages))
        prev = None  # role of the previous turn; "assistant+tools" for one that called tools
        for i, m in enumerate(messages):
            role = m.get("role")
            if role == "system":
                ok = i == 0
            elif role == "user":
                ok = prev in (None, "system", "assistant")
            elif role == "assistant":
                ok = prev in ("user", "tool")
            elif role == "tool":
                ok = prev in ("assistant+tools", "tool")
            else:
                ok = False
            if not ok:
                return Removal(self.name, "wrong_role_order", f"{i}:{prev or 'start'}->{role}")
            if role == "assistant":
                content = m.get("content")
                calls = has_tool_calls(m)
                if not calls and (content is None or not str(content).strip()):
                    return Removal(self.name, "empty_assistant_turn", i)
                prev = "assistant+tools" if calls else "assistant"
            else:
                prev = role
        if self.require_last_assistant and messages[-1].get("role") != "assistant":
            return Removal(self.name, "last_turn_not_assistant", str(messages[-1].get("role")))
        return None


class MaxTurnsFilter(RowFilter):
    """Remove chats with more than `max` (or fewer than `min`) messages, every role counted.
    Reasons: too_many_turns / too_few_turns; the value is the number of messages."""

    def __init__(self, max: int | None = None, min: int | None = None) -> None:  # noqa: A002 - YAML names
        if max is None and min is None:
            raise ValueError("set `max` (and/or `min`): the number of messages allowed")
        for key, value in (("max", max), ("min", min)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{key} must be a non-negative integer (got {value!r})")
        self.max = max
        self.min = min

    def check(self, row: dict[str, Any]) -> Removal | None:
        messages = row.get("messages")
        if messages is None:
            return None
        n = len(messages)
        if self.max is not None and n > self.max:
            return Removal(self.name, "too_many_turns", n)
        if self.min is not None and n < self.min:
            return Removal(self.name, "too_few_turns", n)
        return None


@lru_cache(maxsize=4)
def _tokenizer(name: str) -> Any:
    from forge.engine.tokenizer import load_tokenizer

    return load_tokenizer(name, None, False)


class RoleTokensFilter(RowFilter):
    """Per-role token bounds on every turn, counted with the model's tokenizer (curate.tokenizer):
    `{name: role_tokens, assistant: {min: 1, max: 4096}, user: {max: 8192}}`. A turn's tokens are
    those of its content, reasoning and tool_calls (what the model reads or learns in that turn).
    Reasons: <role>_too_short / <role>_too_long; the value is the turn's token count.
    """

    def __init__(self, tokenizer: str, **roles: Any) -> None:
        if not roles:
            raise ValueError(f"give bounds for at least one role ({', '.join(ROLES)}), e.g. assistant: {{max: 4096}}")
        self.bounds: dict[str, tuple[int, int | None]] = {}
        for role, spec in roles.items():
            if not isinstance(spec, dict):
                raise ValueError(f"{role}: must be a mapping like {{min: 1, max: 4096}} (got {spec!r})")
            unknown = set(spec) - {"min", "max"}
            if unknown:
                raise ValueError(f"{role}: unknown key {sorted(unknown)[0]!r}; keys: min, max")
            for key in ("min", "max"):
                value = spec.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                    raise ValueError(f"{role}.{key}: must be a non-negative integer (got {value!r})")
            self.bounds[role] = (spec.get("min") or 0, spec.get("max"))
        self.tokenizer_name = tokenizer
        self.tokenizer = _tokenizer(tokenizer)

    def count(self, message: dict[str, Any]) -> int:
        parts = [message.get(k) for k in ("content", "reasoning", "tool_calls")]
        text = "\n".join(p for p in parts if p)
        return len(self.tokenizer.encode(text)) if text else 0

    def check(self, row: dict[str, Any]) -> Removal | None:
        messages = row.get("messages")
        if messages is None:
            return None
        bounds = self.bounds
        for m in messages:
            role = m.get("role")
            if role not in bounds:
                continue
            lo, hi = bounds[role]
            n = self.count(m)
            if n < lo:
                return Removal(self.name, f"{role}_too_short", n)
            if hi is not None and n > hi:
                return Removal(self.name, f"{role}_too_long", n)
        return None
