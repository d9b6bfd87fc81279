"""A faster encoder for documents: the same byte-level BPE run by `tiktoken` (measured ~5x the
`tokenizers` library per core on the benchmark's corpus), used only where it gives exactly the
same ids.

A Hugging Face tokenizer qualifies when its model is BPE over byte-level pre-tokens (GPT-2's
`ByteLevel(use_regex=True)`, or a `Split(regex)` followed by `ByteLevel(use_regex=False)` as in
Llama 3 and Qwen), it has no normalizer, and then the check passes: every vocabulary entry and a
fixed multilingual probe are encoded by both, and every id must match. Otherwise documents go
through `tokenizers` as before (chats always do: their loss mask needs character offsets; so does
a document that contains an added token's text, which `tokenizers` maps to that token).
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from typing import Any

log = logging.getLogger("forge.stages.tokenize")
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PROBE = [
    "The quick brown fox jumps over the lazy dog. It's 3:45pm, isn't it?",
    "  leading and trailing spaces  \n\n\ttabs\tand\r\nnewlines   ",
    "Zürich, São Paulo, Kraków, Ελλάδα, Россия, 東京, 서울, مرحبا, שלום, हिन्दी, 😀🚀 emoji",
    "def f(x):\n    return x ** 2  # comment\n\nprint(f(12345678901234567890))",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!!!!!!!!!!!",
]


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte, reversed."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _pattern(pre: dict[str, Any] | None) -> str | None:
    """The pre-tokenizer's split regex, when it is one tiktoken can run."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        return GPT2_PATTERN if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if (
            len(steps) == 2
            and steps[0].get("type") == "Split"
            and "Regex" in (steps[0].get("pattern") or {})
            and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert")
            and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True)
            and not steps[1].get("add_prefix_space")
        ):
            return steps[0]["pattern"]["Regex"]
    return None


def tiktoken_for(fast_tokenizer: Any) -> Any | None:
    """A tiktoken Encoding that gives exactly `fast_tokenizer`'s ids for plain text, or None."""
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(fast_tokenizer.to_str())
    model = spec.get("model") or {}
    pattern = _pattern(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or spec.get("normalizer") or pattern is None or model.get("dropout"):
        return None
    decoder = _byte_decoder()
    specials = {t["content"] for t in spec.get("added_tokens") or []}
    ranks = {}
    try:
        for token, i in model["vocab"].items():
            if token not in specials:
                ranks[bytes(decoder[c] for c in token)] = i
    except KeyError:  # a vocabulary entry that is not byte-level
        return None
    if any(bytes([b]) not in ranks for b in range(256)):  # tiktoken needs every byte (it panics otherwise)
        return None
    try:
        enc = tiktoken.Encoding("forge-check", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    except Exception as exc:  # a regex tiktoken's engine rejects, duplicate ranks...
        log.info("tokenize: tiktoken cannot run this tokenizer (%s); using tokenizers", exc)
        return None
    words = []
    for token in model["vocab"]:
        if token in specials:
            continue
        try:
            words.append(bytes(decoder[c] for c in token).decode("utf-8"))
        except UnicodeDecodeError:
            continue  # part of a multi-byte character: covered by the probe
    probe = PROBE + words
    want = [e.ids for e in fast_tokenizer.encode_batch(probe, add_special_tokens=False)]
    got = [enc.encode_ordinary(t) for t in probe]
    if want != got:
        bad = next(t for t, a, b in zip(probe, want, got, strict=True) if a != b)
        log.info("tokenize: tiktoken differs from tokenizers on %r; using tokenizers", bad[:40])
        return None
    return enc
