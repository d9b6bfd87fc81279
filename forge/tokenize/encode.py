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
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from forge.tokenize.config import TokenizeConfig
from forge.tokenize.fast import tiktoken_for


class TokenizerError(ValueError):
    """The tokenizer cannot be loaded (offline); the message says what was tried."""


class RowError(ValueError):
    """This row cannot be tokenized (its reason goes to rejected/)."""


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

    def loss_tokens(self) -> int:
        return len(self.tokens) if self.mask is None else int(self.mask.sum())


class Encoder:
    """Token ids and loss masks. `stage` names the knobs in its messages (`score.mask` when the
    score stage encodes); `tokenizer_key` the knob that chose the tokenizer."""

    def __init__(self, name: str, cfg: TokenizeConfig, stage: str = "tokenize", tokenizer_key: str = "") -> None:
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
        self.tiktoken = tiktoken_for(self.fast) if cfg.fast else None  # documents only (forge/tokenize/fast.py)
        added = sorted(self.hf.get_added_vocab(), key=len, reverse=True)
        self.added = re.compile("|".join(map(re.escape, added))) if added else None

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
        rendered: list[tuple[str, list[tuple[int, int]]] | RowError] = []
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
            out.append(Encoded(np.array(ids, dtype=self.dtype), mask))
        return out

    def _render(self, messages: list[dict[str, Any]], generation: bool = False) -> str:
        try:
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception as exc:  # jinja2 errors, a template's raise_exception
            raise RowError(f"the chat template failed: {type(exc).__name__}: {exc}") from None

    def render(self, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """(the rendered chat, the character spans of the loss mask)."""
        msgs = [template_message(m) for m in messages]
        full = self._render(msgs)
        if self.cfg.mask == "all":
            return full, [(0, len(full))]
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if self.cfg.mask == "last":
            turns = turns[-1:]
        if not turns:
            raise RowError(f"no assistant turn: nothing to train on ({self.stage}.mask)")
        spans, cursor = [], 0
        for i in turns:
            m = msgs[i]
            if (
                not m["content"].strip()
                and not m.get("tool_calls")
                and not (self.cfg.reasoning and m.get("reasoning_content"))
            ):
                raise RowError(f"turn {i}: an empty assistant turn (nothing but its end marker to train on)")
            before = self._render(msgs[:i], generation=True)
            after = self._render(msgs[: i + 1])
            if after.startswith(before) and full.startswith(after):
                lo, hi = len(before), len(before) + len(after[len(before) :].rstrip())
            else:  # the template rewrites earlier turns: find this turn in the whole render
                lo, hi = self._find(full, msgs[i], before, after, cursor, i)
            reasoning = msgs[i].get("reasoning_content")
            if not self.cfg.reasoning and reasoning:
                lo = _after_reasoning(full, lo, hi, reasoning)
            spans.append((lo, hi))
            cursor = hi
        return full, spans

    def _find(self, full: str, m: dict[str, Any], before: str, after: str, cursor: int, i: int) -> tuple[int, int]:
        """This turn's span in the whole render when the template renders it differently there
        (Qwen3 drops the reasoning of turns before the last user turn): its own rendering, with or
        without the reasoning, else its content followed by the end-of-turn marker."""
        seg = after[len(before) :] if after.startswith(before) else ""
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
