"""Turning a prompt-column value into chat messages that fit the model. Config: conf/prompt.

Three input formats: a plain string, a string placed into a [[DOCUMENT]] template, or a list
of {role, content} messages (also when it arrives as a JSON string, as CSV cells and some JSON
lines files hold it); `prompt.system` is prepended unless the row brings its own.
Bad values raise RowRejected with a reason (the row is quarantined, never dropped). Prompts
are measured with the model's own tokenizer; over-long ones lose the end of their document
part (never the template's instructions) or are skipped, as configured.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from forge.engine.tokenizer import Tokenizer
from forge.schema import ConfigError
from forge.stages.generate.config import Overlong, PromptConfig

log = logging.getLogger("forge.stages.generate.prompt")
PLACEHOLDER = "[[DOCUMENT]]"
ROLES = ("system", "user", "assistant", "tool", "developer")
# a prompt.template value without [[DOCUMENT]] ending in one of these is taken for a file name
TEMPLATE_SUFFIXES = (".txt", ".md", ".j2", ".jinja", ".jinja2", ".tmpl", ".tpl", ".prompt", ".text")


class RowRejected(Exception):
    """This row cannot be sent; the message is the quarantine reason."""


def _looks_like_path(text: str) -> bool:
    """A one-line value that names a file rather than inline template text."""
    if "\n" in text or len(text) >= 4096 or not text.strip():
        return False
    seps = {"/", os.sep, os.altsep} - {None}
    return any(sep in text for sep in seps) or text.lower().endswith(TEMPLATE_SUFFIXES) or text.startswith(("~", "."))


def load_template(cfg: PromptConfig) -> str | None:
    """prompt.template as text: inline (contains [[DOCUMENT]]) or read from a file path."""
    if cfg.template is None:
        return None
    text = cfg.template
    if PLACEHOLDER in text:
        return text
    path = Path(text).expanduser() if text.strip() and len(text) < 4096 and "\0" not in text else None
    try:
        exists = path is not None and path.exists()
    except OSError:  # e.g. a name too long for the file system: inline text
        exists = False
    if not exists:
        if path is not None and _looks_like_path(text):
            raise ConfigError(f"prompt.template: no such file: {path}")
        raise ConfigError(f"prompt.template: must contain {PLACEHOLDER} or be a path to a file that does")
    assert path is not None
    if path.is_dir():
        raise ConfigError(f"prompt.template: {path} is a directory, not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"prompt.template: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"prompt.template: cannot read {path}: {exc.strerror or exc}") from None
    if PLACEHOLDER not in text:
        raise ConfigError(f"prompt.template: the file {path} does not contain {PLACEHOLDER}")
    return text


@dataclass(frozen=True)
class Built:
    """Messages plus where the document sits in them, so truncation can cut just that part."""

    messages: tuple[tuple[str, str], ...]
    doc_message: int | None = None  # index into messages of the message holding the document
    prefix: str = ""
    doc: str = ""
    suffix: str = ""

    def with_doc(self, doc: str) -> Built:
        assert self.doc_message is not None
        msgs = list(self.messages)
        role = msgs[self.doc_message][0]
        msgs[self.doc_message] = (role, self.prefix + doc + self.suffix)
        return replace(self, messages=tuple(msgs), doc=doc)

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


def _valid_text(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowRejected(f"{where} holds invalid Unicode ({exc.reason} at character {exc.start})") from None
    return text


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return _valid_text(content, f"{where}.content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return _valid_text("".join(str(p.get("text", "")) for p in content), f"{where}.content")
    if content is None:
        raise RowRejected(f"{where}.content is null")
    raise RowRejected(f"{where}.content has type {type(content).__name__}; expected a string")


def _messages(value: Any) -> list[tuple[str, str]]:
    if len(value) == 0:
        raise RowRejected("messages list is empty")
    out = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RowRejected(f"{where} has type {type(msg).__name__}; expected {{role, content}}")
        if "role" not in msg or "content" not in msg:
            raise RowRejected(f"{where} lacks {'role' if 'role' not in msg else 'content'}")
        role = msg["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise RowRejected(f"{where}.role {role!r} is not one of {', '.join(ROLES)}")
        out.append((role, _content_text(msg["content"], where)))
    if not any(role == "user" for role, _ in out):
        raise RowRejected("messages list has no user message")
    if out[-1][0] == "assistant":
        raise RowRejected("messages list ends with an assistant message; nothing to answer")
    if not any(content.strip() for role, content in out if role == "user"):
        raise RowRejected("every user message is empty")
    return out


def _json_list(text: str) -> list[dict[str, Any]] | None:
    """The list of objects a string holds as JSON (a messages list stored as text, as CSV cells
    and some JSON lines files hold it), or None when the string is plain text: not a JSON list,
    an empty one, or one whose items are not all objects (such as "[1, 2]")."""
    stripped = text.strip()
    if not (stripped.startswith("[") and stripped.endswith("]")):
        return None
    try:
        parsed = json.loads(stripped)
    except (ValueError, RecursionError):
        return None
    if not isinstance(parsed, list) or not parsed or not all(isinstance(m, dict) for m in parsed):
        return None
    return parsed


def build(value: Any, cfg: PromptConfig, template: str | None) -> Built:
    """Validate a prompt-column value and build the conversation (RowRejected on bad input)."""
    if value is None:
        raise RowRejected("prompt is null")
    parsed = _json_list(value) if isinstance(value, str) else None
    if parsed is not None:
        try:
            msgs = _messages(parsed)
        except RowRejected as exc:
            raise RowRejected(f"prompt is a JSON string of a list that is not a valid messages list: {exc}") from None
        value = parsed  # from here on exactly like a real list: no document, never truncated
    elif isinstance(value, str):
        if not value.strip():
            raise RowRejected("prompt is empty")
        msgs = [("user", _valid_text(value, "prompt"))]
    elif isinstance(value, (list, tuple)):
        msgs = _messages(value)
    else:
        raise RowRejected(
            f"prompt has type {type(value).__name__}; expected a string or a list of {{role, content}} messages"
        )
    doc_message = None
    prefix = suffix = doc = ""
    if template is not None or isinstance(value, str):
        doc_message = max(i for i, (role, _) in enumerate(msgs) if role == "user")
        doc = msgs[doc_message][1]
        if template is not None:
            prefix, _, suffix = template.partition(PLACEHOLDER)
            msgs[doc_message] = ("user", prefix + doc + suffix)
    if cfg.system is not None and msgs[0][0] != "system":
        msgs.insert(0, ("system", cfg.system))
        if doc_message is not None:
            doc_message += 1
    return Built(tuple(msgs), doc_message, prefix, doc, suffix)


def _prefix(text: str, limit: int) -> str:
    """About the first `limit` characters of text, ending before a space or newline when one is
    near, so the cut does not split a word (and its tokens) in two."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    space = max(head.rfind(" "), head.rfind("\n"))
    return head[:space] if space > limit // 2 else head


class LengthFitter:
    """Measures prompts with the model's tokenizer against a token budget and fits them."""

    SLACK = 16
    CUT = 16  # characters per budget token kept of a huge prompt before exact counting
    MIN_CUT = 1 << 16

    def __init__(
        self,
        tokenizer: Tokenizer | None,
        budget: int | None,
        on_overlong: Overlong,
        template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.tok = tokenizer
        self.budget = budget
        self.on_overlong = on_overlong
        self.template_kwargs = template_kwargs or {}
        self._overhead: dict[tuple[str, ...], int] = {}
        if tokenizer is not None and not tokenizer.has_template:
            log.warning("the tokenizer has no chat template; prompt lengths are estimated from the plain text")

    def render(self, built: Built) -> str:
        assert self.tok is not None
        return self.tok.render(built.as_dicts(), **self.template_kwargs)

    def count(self, built: Built) -> int:
        assert self.tok is not None
        return len(self.tok.encode(self.render(built)))

    def _upper_bound(self, built: Built) -> int:
        """Token count <= rendered UTF-8 bytes (each token spans >= 1 byte): skips exact counting
        for prompts far below the budget, which is almost all of them."""
        roles = tuple(r for r, _ in built.messages)
        if roles not in self._overhead:
            empty = Built(tuple((r, "") for r in roles))
            self._overhead[roles] = len(self.render(empty).encode()) + self.SLACK
        return self._overhead[roles] + sum(len(c.encode()) for _, c in built.messages)

    def _measure(self, built: Built, truncating: bool) -> tuple[Built, int, bool]:
        """(what to fit, its token count, exact?) for a prompt over the byte bound.

        A huge prompt (a 5 MB document) is not tokenized whole, which takes seconds: a prefix
        of budget * CUT characters (a few tokens' worth each) is counted first; if that prefix
        alone is over the budget, so is the whole, and truncation works from the prefix. Only
        the document is cut when truncating (instructions stay whole); otherwise every message
        is. The prefix grows 4x while it fits, up to the whole prompt (then the count is exact)."""
        assert self.budget is not None
        limit = max(self.budget * self.CUT, self.MIN_CUT)
        while True:
            if truncating:
                cut = built.with_doc(_prefix(built.doc, limit)) if len(built.doc) > limit else built
            elif any(len(c) > limit for _, c in built.messages):
                cut = replace(built, messages=tuple((r, _prefix(c, limit)) for r, c in built.messages))
            else:
                cut = built
            n = self.count(cut)
            if cut is built:
                return built, n, True
            if n > self.budget:
                return cut, n, False
            limit *= 4

    def fit(self, built: Built) -> tuple[Built, bool]:
        """(fitted prompt, truncated?) or RowRejected."""
        if self.tok is None or self.budget is None or self._upper_bound(built) <= self.budget:
            return built, False
        truncating = self.on_overlong == Overlong.truncate and built.doc_message is not None
        size = sum(len(c.encode("utf-8", "surrogatepass")) for _, c in built.messages)
        built, n, exact = self._measure(built, truncating)
        if n <= self.budget:
            return built, False
        length = f"{n} tokens" if exact else f"at least {n} tokens ({size} bytes)"
        if not truncating:
            why = "prompt.on_overlong=skip" if built.doc_message is not None else "messages lists are not truncated"
            raise RowRejected(f"prompt is {length}, over the budget of {self.budget} ({why})")
        ids = self.tok.encode(built.doc)
        margin = 4
        for _ in range(6):
            keep = len(ids) - (n - self.budget) - margin
            if keep <= 0:
                raise RowRejected(
                    f"prompt is {length}, over the budget of {self.budget}, and the template and "
                    "system prompt alone leave no room for the document"
                )
            ids = ids[:keep]
            built = built.with_doc(self.tok.decode(ids))
            n = self.count(built)
            if n <= self.budget:
                return built, True
            margin *= 2
        raise RowRejected(f"prompt is {length} and could not be truncated under {self.budget}")
