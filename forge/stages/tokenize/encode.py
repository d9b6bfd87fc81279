"""Rows to token ids and a loss mask, with the model's tokenizer and chat template.

Documents are encoded with the `tokenizers` library's batch encoder (no offsets: the fast path).
A chat is rendered with its chat template; the loss mask is computed by forge itself, from the
rendered prefixes, not from `{% generation %}` markers (most templates have none, and then
transformers' assistant mask is silently all zero): assistant turn i covers the characters between
render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]) (its content and
end-of-turn marker, not the whitespace the template writes after it), both of which must be
prefixes of the whole render. A template that rewrites earlier turns (Qwen3 drops the reasoning of
past turns) breaks that; then the turn is found by its content in the whole render, followed by
what the template writes after a turn. Tokens whose first character is in a turn's span are in the
mask. A chat whose mask comes out empty, or whose turns cannot be found, is quarantined with the
reason.

Nothing a template leaves out is lost silently: each assistant turn's tool calls (and a trained
turn's reasoning) must appear in that turn's own rendering, else the row is quarantined
(`on_dropped=quarantine`, DroppedContent) or kept and marked (`keep`); a turn whose span holds no
content (a bare end-of-turn marker) is never trained on. An assistant-first chat's first turn
starts after the template's assistant header (found with a probe chat: messages[:0] is no chat).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from forge.stages.tokenize.config import ON_DROPPED, TokenizeConfig
from forge.stages.tokenize.fast import tiktoken_for


class TokenizerError(ValueError):
    """The tokenizer cannot be loaded (offline); the message says what was tried."""


class RowError(ValueError):
    """This row cannot be tokenized (its reason goes to rejected/, under `step`)."""

    step = "chat_template"


class DroppedContent(RowError):
    """An assistant turn's tool calls or reasoning that the chat template does not render."""

    step = "dropped_content"


def load_tokenizer(name: str, key: str = "tokenize.tokenizer") -> Any:
    """A transformers fast tokenizer from a local dir or the local Hub cache (never downloads);
    errors name `key`, the knob that chose it."""
    from transformers import AutoTokenizer

    where = "a local directory" if os.path.isdir(name) else "a Hub id, looked up in the local cache only"
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, EnvironmentError...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenizerError(
            f"{key}: cannot load {name!r} ({where}; forge never downloads at run time): {first}. "
            "Pass a local tokenizer dir, or fetch the tokenizer into the cache first (`hf download <id>`)"
        ) from None
    if not getattr(tok, "is_fast", False):
        raise TokenizerError(f"{key}: {name!r} has no fast (Rust) tokenizer; forge needs tokenizer.json")
    return tok


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class Encoded:
    tokens: np.ndarray
    mask: np.ndarray | None  # None: every token is trained on (a document)
    dropped: tuple[str, ...] = ()  # kept (on_dropped=keep) though the template drops these: "tool calls", ...

    def loss_tokens(self) -> int:
        return len(self.tokens) if self.mask is None else int(self.mask.sum())


class Encoder:
    """Token ids and loss masks. `stage` names the knobs in its messages (`score.mask` when the
    score stage encodes); `tokenizer_key` the knob that chose the tokenizer; `on_dropped` what
    becomes of a chat whose tool calls or reasoning the template does not render (quarantine |
    keep; None = cfg.on_dropped, quarantine unless tokenize.on_dropped says otherwise)."""

    def __init__(
        self,
        name: str,
        cfg: TokenizeConfig,
        stage: str = "tokenize",
        tokenizer_key: str = "",
        on_dropped: str | None = None,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.stage = stage
        key = tokenizer_key or f"{stage}.tokenizer"
        self.hf = load_tokenizer(name, key)
        self.fast = self.hf.backend_tokenizer
        self.vocab_size = len(self.hf)
        self.dtype = token_dtype(self.vocab_size)
        self.eos = self.hf.eos_token_id
        if cfg.eos and self.eos is None:
            raise TokenizerError(f"{key}: {name!r} has no EOS token; set {stage}.eos=false")
        self.tiktoken = tiktoken_for(self.fast) if cfg.fast else None  # documents only (forge/stages/tokenize/fast.py)
        added = sorted(self.hf.get_added_vocab(), key=len, reverse=True)
        self.added = re.compile("|".join(map(re.escape, added))) if added else None
        self.on_dropped = on_dropped if on_dropped is not None else cfg.on_dropped
        if self.on_dropped not in ON_DROPPED:
            raise ValueError(f"on_dropped: {self.on_dropped!r}; one of {', '.join(ON_DROPPED)}")
        self._assistant_header: str | None = None

    def identity(self) -> dict[str, Any]:
        """What must not change under a run dir (the stage fingerprint)."""
        return {
            "tokenizer": self.name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos,
            "dtype": self.dtype.name,
            "vocab_hash": hash_vocab(self.fast),
        }

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if self.tiktoken is None:
            encode = getattr(self.fast, "encode_batch_fast", self.fast.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        out = []
        for text in texts:
            if self.added is not None and self.added.search(text):  # tokenizers maps these to their ids
                out.append(self.fast.encode(text, add_special_tokens=False).ids)
            else:
                out.append(self.tiktoken.encode_ordinary(text))
        return out

    def documents(self, texts: list[str]) -> list[Encoded]:
        out = []
        for ids in self._ids(texts):
            if self.cfg.eos:
                ids.append(self.eos)
            out.append(Encoded(np.array(ids, dtype=self.dtype), None))
        return out

    def chats(self, chats: list[list[dict[str, Any]]]) -> list[Encoded | RowError]:
        rendered: list[tuple[str, list[tuple[int, int]], tuple[str, ...]] | RowError] = []
        for messages in chats:
            try:
                rendered.append(self.render(messages))
            except RowError as exc:
                rendered.append(exc)
        texts = [r[0] for r in rendered if not isinstance(r, RowError)]
        encodings = iter(self.fast.encode_batch(texts, add_special_tokens=False))
        out: list[Encoded | RowError] = []
        for r in rendered:
            if isinstance(r, RowError):
                out.append(r)
                continue
            enc = next(encodings)
            starts = np.fromiter((o[0] for o in enc.offsets), dtype=np.int64, count=len(enc.offsets))
            mask = np.zeros(len(starts), dtype=np.uint8)
            for lo, hi in r[1]:
                mask[(starts >= lo) & (starts < hi)] = 1
            ids = enc.ids
            if self.cfg.eos and ids[-1:] != [self.eos]:
                ids.append(self.eos)
                mask = np.append(mask, np.uint8(0))
            if not mask.any():
                out.append(RowError(f"empty loss mask: no token of an assistant turn ({self.stage}.mask)"))
                continue
            out.append(Encoded(np.array(ids, dtype=self.dtype), mask, r[2]))
        return out

    def _render(self, messages: list[dict[str, Any]], generation: bool = False) -> str:
        if not messages:  # an empty chat renders as nothing (templates raise on it)
            return ""
        try:
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception as exc:  # jinja2 errors, a template's raise_exception
            raise RowError(f"the chat template failed: {type(exc).__name__}: {exc}") from None

    def _header(self) -> str:
        """What the template writes before an assistant turn (its generation prompt), from a probe
        chat: an assistant-first chat has no messages[:0] to render it from. "" if unknown."""
        if self._assistant_header is None:
            probe = [{"role": "user", "content": "?"}]
            try:
                plain, prompted = self._render(probe), self._render(probe, generation=True)
            except RowError:
                plain, prompted = "", ""
            self._assistant_header = prompted[len(plain) :] if prompted.startswith(plain) else ""
        return self._assistant_header

    def _around(self, msgs: list[dict[str, Any]], i: int) -> tuple[str | None, str]:
        """(the render before assistant turn i, with the generation prompt; the render up to and
        with it). Before a first turn: what its render holds up to the assistant header (a default
        system prompt, the header), None when the header is not found there."""
        after = self._render(msgs[: i + 1])
        if i:
            return self._render(msgs[:i], generation=True), after
        header = self._header()
        at = after.find(header) if header else -1
        return (after[: at + len(header)] if at >= 0 else None), after

    def render(self, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]], tuple[str, ...]]:
        """(the rendered chat, the character spans of the loss mask, what the template dropped and
        on_dropped=keep kept). Every assistant turn's tool calls, and a trained turn's reasoning, are
        checked against the turn as the template renders it (on_dropped: quarantine raises); a
        turn with nothing but markup in its span (a bare end-of-turn marker) is not trained on."""
        msgs = [template_message(m) for m in messages]
        full = self._render(msgs)
        assistant = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        trained = set(assistant[-1:] if self.cfg.mask == "last" else assistant)
        if not trained and self.cfg.mask != "all":
            raise RowError(f"no assistant turn: nothing to train on ({self.stage}.mask)")
        dropped: set[str] = set()
        spans, cursor = [], 0
        for i in assistant:
            m = msgs[i]
            train = i in trained
            reasoning = m.get("reasoning_content")
            checks = m.get("tool_calls") or (train and self.cfg.reasoning and reasoning)
            if train and self.cfg.mask != "all" and not (m["content"].strip() or checks):
                raise RowError(f"turn {i}: an empty assistant turn (nothing but its end marker to train on)")
            if not checks and (not train or self.cfg.mask == "all"):
                continue  # nothing to check, no span to find
            before, after = self._around(msgs, i)
            seg = after[len(before) :] if before is not None and after.startswith(before) else ""
            dropped.update(self._check_rendered(m, seg or after, i, train))
            if not train or self.cfg.mask == "all":
                continue
            if seg and full.startswith(after):
                lo, hi = len(before), len(before) + len(seg.rstrip())
            else:  # the template rewrites earlier turns: find this turn in the whole render
                lo, hi = self._find(full, m, seg, after, cursor, i)
            if not self.cfg.reasoning and reasoning:
                lo = _after_reasoning(full, lo, hi, reasoning)
            cursor = hi
            if _has_content(full[lo:hi], self.added):
                spans.append((lo, hi))
        if self.cfg.mask == "all":
            spans = [(0, len(full))]
        return full, spans, tuple(sorted(dropped))

    def _check_rendered(self, m: dict[str, Any], text: str, i: int, trained: bool) -> list[str]:
        """What of assistant turn i the template left out of `text` (its rendering): tool calls (a
        call's name or an argument value missing) and, when trained on, reasoning (a template that
        drops past turns' reasoning still renders it here: not a loss). Raises DroppedContent with
        on_dropped=quarantine; returns the kinds dropped with on_dropped=keep."""
        missing = []
        calls = m.get("tool_calls") or []
        if calls and not all(_call_rendered(c, text) for c in calls):
            missing.append("tool calls")
        reasoning = (m.get("reasoning_content") or "").strip()
        if trained and self.cfg.reasoning and reasoning and reasoning not in text:
            missing.append("reasoning")
        if missing and self.on_dropped == "quarantine":
            what = " and ".join(missing)
            hint = f" ({self.stage}.on_dropped=keep keeps such rows, counted)" if self.stage == "tokenize" else ""
            raise DroppedContent(
                f"turn {i}: the chat template does not render its {what}, so training on this row "
                f"would teach the turn without them{hint}"
            )
        return missing

    def _find(self, full: str, m: dict[str, Any], seg: str, after: str, cursor: int, i: int) -> tuple[int, int]:
        """This turn's span in the whole render when the template renders it differently there
        (Qwen3 drops the reasoning of turns before the last user turn): its own rendering `seg`,
        with or without the reasoning, else its content followed by the end-of-turn marker."""
        candidates = [seg.rstrip()]
        reasoning = m.get("reasoning_content")
        if seg and reasoning and reasoning in seg:
            candidates.append(seg[_after_reasoning(seg, 0, len(seg), reasoning) :].rstrip())
        for text in candidates:
            at = full.find(text, cursor) if text else -1
            if at >= 0:
                return at, at + len(text)
        content = m.get("content") or ""
        at = full.find(content, cursor) if content else -1
        if at < 0:
            raise RowError(f"turn {i}: not found where the chat template renders the whole chat")
        end = at + len(content)
        tail_at = after.rfind(content)
        tail = after[tail_at + len(content) :].rstrip() if tail_at >= 0 else ""
        if tail and full.startswith(tail, end):
            end += len(tail)  # the end-of-turn marker the model must learn to write
        return at, end


_CLOSING = re.compile(r"\s*(</[^<>\s]+>)?\s*")
_MARKUP = re.compile(r"</?[A-Za-z_][\w:-]*>")


def _has_content(span: str, added: re.Pattern | None) -> bool:
    """Whether a turn's span holds anything but special tokens, tags and whitespace: a bare
    `<|im_end|>` (a tool-call-only turn whose calls the template dropped) is nothing to learn."""
    text = added.sub("", span) if added is not None else span
    return bool(_MARKUP.sub("", text).strip())


def _leaves(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in _leaves(v)]
    if isinstance(value, str):
        return [value] if value.strip() else []
    return [] if value is None or isinstance(value, bool) else [str(value)]


def _call_rendered(call: Any, text: str) -> bool:
    """A tool call is rendered when its function name and each argument value are in the text
    (as written, or JSON-escaped: templates write arguments with tojson)."""
    if not isinstance(call, dict):
        return str(call) in text
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    name = fn.get("name")
    if name and name not in text:
        return False
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return args in text
    forms = (lambda v: v, lambda v: json.dumps(v)[1:-1], lambda v: json.dumps(v, ensure_ascii=False)[1:-1])
    return all(any(f(v) in text for f in forms) for v in _leaves(args))


def _after_reasoning(text: str, lo: int, hi: int, reasoning: str) -> int:
    """Where a turn's span starts without its reasoning: after the reasoning text, the tag that
    closes it and the whitespace around (lo when the reasoning is not rendered in [lo, hi))."""
    at = text.find(reasoning, lo, hi)
    if at < 0:
        return lo
    return _CLOSING.match(text, at + len(reasoning), hi).end()


def template_message(m: dict[str, Any]) -> dict[str, Any]:
    """A curated message as chat templates expect it: content a string, reasoning as
    `reasoning_content`, tool calls as a list of dicts."""
    out: dict[str, Any] = {"role": m.get("role") or "user", "content": m.get("content") or ""}
    if m.get("reasoning"):
        out["reasoning_content"] = m["reasoning"]
    calls = m.get("tool_calls")
    if calls:
        try:
            parsed = json.loads(calls) if isinstance(calls, str) else calls
        except ValueError:
            parsed = None
        if isinstance(parsed, list):
            out["tool_calls"] = parsed
    return out


def hash_vocab(fast: Any) -> str:
    import xxhash

    vocab = fast.get_vocab(with_added_tokens=True)
    h = xxhash.xxh3_64()
    for token, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{i}\x00{token}\x01".encode("utf-8", "surrogatepass"))
    return h.hexdigest()
