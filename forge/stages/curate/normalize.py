"""Bring a source row of any chat or text shape into the curated schema (forge/stages/curate/rows.py).

Shapes (a source's `format`; `auto` detects it per row, see `detect_format`):

- messages: an OpenAI `messages` list of {role, content[, reasoning_content|reasoning|thinking][, tool_calls]}.
- sharegpt: a `conversations` list of {from, value} (human/gpt/system/tool...).
- prompt_response: a prompt and a response column (prompt/response, question/answer,
  instruction/output(+input), problem/solution, ...), or the ones `columns` names.
- harmony: gpt-oss Harmony text (`<|start|>role<|message|>...<|end|>`), parsed with openai-harmony
  (forge/stages/curate/harmony.py).
- text: a plain document (`text`, or `columns.text`).
- forge: a row forge's own generation wrote (prompt `messages` + `text` completion + `reasoning`).

`meta_*` columns come from the source's `meta` map (conf/dataset YAML), never from code; see
forge/stages/curate/meta.py for the maps.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Mapping
from typing import Any, Protocol

import orjson

from forge.schema import ConfigError
from forge.stages.curate.harmony import HARMONY_START as HARMONY_START
from forge.stages.curate.harmony import O200K_SHA256 as O200K_SHA256
from forge.stages.curate.harmony import HarmonyUnavailable as HarmonyUnavailable
from forge.stages.curate.harmony import harmony_encoding as harmony_encoding
from forge.stages.curate.harmony import harmony_messages
from forge.stages.curate.harmony import harmony_vocab_dir as harmony_vocab_dir
from forge.stages.curate.meta import META_OPTIONS as META_OPTIONS
from forge.stages.curate.meta import OTHER_META_OPTIONS as OTHER_META_OPTIONS
from forge.stages.curate.meta import check_meta, compile_meta, meta_name
from forge.stages.curate.rows import BAD_UNICODE, Unnormalizable, content_id, curated_schema

FORMATS = ("messages", "sharegpt", "prompt_response", "harmony", "text", "forge", "curated")
COLUMN_ROLES = ("messages", "conversations", "prompt", "response", "input", "text", "system", "reasoning", "id")

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
    if fmt == "curated":
        row = _curated(record, plan)
        check_unicode(row)
        return row
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
            col = column or plan.columns.get("text", "text")
            text = record.get(col)
            if text.__class__ is not str:
                raise _not_string(col, text)
            messages = harmony_messages(text, col)
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
    check_unicode(row)
    return row


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_unicode(row: dict) -> None:
    """A lone surrogate (JSON lets `"\\ud800"` through) can be neither tokenized, embedded nor
    written to Parquet: every stage quarantines the row here, naming the field, instead of failing
    later in a tokenizer or silently turning it into U+FFFD."""
    bad = _SURROGATE.search
    text = row.get("text")
    if text is not None and bad(text):
        raise Unnormalizable(f"{BAD_UNICODE}, in text")
    for i, m in enumerate(row.get("messages") or ()):
        for key in ("content", "reasoning", "tool_calls", "role"):
            value = m.get(key)
            if value is not None and bad(value):
                raise Unnormalizable(f"{BAD_UNICODE}, in messages[{i}].{key}")
    for key, value in row.items():
        if key.startswith("meta_") and value.__class__ is str and bad(value):
            raise Unnormalizable(f"{BAD_UNICODE}, in {key}")
    for key, value in (row.get("source") or {}).items():
        if value.__class__ is str and bad(value):
            raise Unnormalizable(f"{BAD_UNICODE}, in source.{key}")


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
            names.add(meta_name(kind))
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
    check_meta(getattr(spec, "meta", None) or {}, key)


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
            self.meta.append((meta_name(kind), compile_meta(kind, opts, f"meta.{kind}")))
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
    if "num_turns" in record and "has_tool_calls" in record and isinstance(record.get("source"), dict):
        return "curated", None  # a row forge curated before (a curate run dir as input)
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


def _curated(record: dict, plan: Any) -> dict:
    """A row of an earlier curate run: already in the schema, passed through. Its id (an up-sampled
    repeat's `.k` included), source (provenance) and meta_* are kept."""
    messages = record.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise Unnormalizable("column 'messages': not a list of messages (a curated row was altered)")
        messages = [{k: m.get(k) for k in ("role", "content", "reasoning", "tool_calls")} for m in messages]
        _check_not_empty(messages)
        text = None
    else:
        text = record.get("text")
        if text.__class__ is not str or not text.strip():
            raise Unnormalizable("a curated row with neither messages nor text")
    row = {
        "id": record["id"] if isinstance(record.get("id"), str) else content_id(messages, text),
        "messages": messages,
        "text": text,
        "source": record["source"],
        "num_turns": len(messages) if messages is not None else 1,
        "has_tool_calls": any(m["tool_calls"] is not None for m in messages or []),
        "has_reasoning": any(m["reasoning"] is not None for m in messages or []),
    }
    row.update(plan.null_meta)
    row.update({k: record[k] for k in plan.null_meta if record.get(k) is not None})
    for out, read in plan.meta:  # a field map given for this source still wins
        value = read(record)
        if value is not None:
            row[out] = value
    return row


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
