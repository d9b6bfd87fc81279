"""Keeping secrets out of every file and stream forge writes: logs, the engine's log (its
command line and its own output), dumped configs, command.json, cards and the terminal.

One masking path: `redact_text` masks every known secret value, and `redact` also masks the
value of any secret-looking key. Values become known three ways: env vars that hold secrets
(HF_TOKEN, the one model.api_key_env names), tokens read from files (the saved Hub login), and
every value under a secret-looking key anywhere in the config (`register_config_secrets`), so
`+model.engine_args.api-key=...` is masked in the engine's command line too.
"""

from __future__ import annotations

import io
import logging
import os
import re
from typing import Any, TextIO

# a key is secret if its last word is one of these, in any spelling: api_key, api-key, apiKey,
# X-Api-Key, hf_token, Authorization, client_secret, db.password ... (not max_tokens, api_key_env)
SECRET_WORDS = {
    "key",
    "apikey",
    "token",
    "secret",
    "password",
    "passwd",
    "pwd",
    "authorization",
    "auth",
    "credential",
    "credentials",
    "bearer",
    "cookie",
}
SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_\-]{16,}|gh[pousr]_[A-Za-z0-9]{20,})\b")
BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{8,}")
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY")
MASK = "***"
MIN_SECRET_LEN = 4  # shorter values would mask ordinary words everywhere
_extra_env: set[str] = set()
_extra_values: set[str] = set()


def _words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def is_secret_key(key: object) -> bool:
    """True for keys that name a secret: `api-key`, `X-Api-Key`, `hf_token`, `Authorization` ..."""
    words = _words(str(key).lstrip("+~"))
    if not words:
        return False
    return words[-1] in SECRET_WORDS or "".join(words[-2:]) in SECRET_WORDS


def register_secret_env(name: str | None) -> None:
    """Also mask the value of this env var (e.g. the one model.api_key_env names)."""
    if name:
        _extra_env.add(name)


def register_secret_value(value: str | None) -> None:
    """Also mask this value (a token read from a file, e.g. the saved Hugging Face login)."""
    if value and len(value) >= MIN_SECRET_LEN:
        _extra_values.add(value)


URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)([^/\s@]+)@")


def register_text_secrets(text: str) -> None:
    """Secrets inside a string value: `https://user:PASS@host`, `export API_KEY=...` (cluster.setup),
    `--api-key VALUE` (an sbatch or engine line written as text)."""
    for m in URL_PASSWORD.finditer(text):
        register_secret_value(m.group(2))
    tokens = [t.strip("'\"") for t in re.split(r"[\s;]+", text) if t]
    for i, token in enumerate(tokens):
        name, sep, value = token.partition("=")
        if sep and value and is_secret_key(name.lstrip("-")):
            register_secret_value(value)
        elif not sep and token.startswith("-") and is_secret_key(token.lstrip("-")) and i + 1 < len(tokens):
            register_secret_value(tokens[i + 1])


def register_config_secrets(tree: Any) -> None:
    """Register every value under a secret-looking key of a plain config tree (nested anywhere),
    and secrets written inside string values (URL passwords, `KEY=value` lines)."""
    if isinstance(tree, str):
        register_text_secrets(tree)
    elif isinstance(tree, dict):
        for key, value in tree.items():
            if is_secret_key(key) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
                text = str(value)
                register_secret_value(text)
                if text.lower().startswith(("bearer ", "basic ")):
                    register_secret_value(text.split(None, 1)[1].strip())
            else:
                register_config_secrets(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            register_config_secrets(value)


def register_override_secrets(overrides: list[str]) -> None:
    """Values of `key=value` command-line overrides whose key names a secret."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and is_secret_key(key.split(".")[-1]) and value:
            register_secret_value(value.strip("'\""))
        elif sep:
            register_text_secrets(value)


def lift_secrets(tree: Any, path: str = "") -> tuple[Any, dict[str, str]]:
    """A copy of a config tree whose secret values are `${oc.env:FORGE_SECRET_...}` references,
    and the env vars that hold them: what a Slurm job pickles then holds no secret (sbatch passes
    the submitter's environment on, and the job resolves the references)."""
    env: dict[str, str] = {}
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            where = f"{path}_{key}" if path else str(key)
            if is_secret_key(key) and isinstance(value, str) and value and not value.startswith("${"):
                name = "FORGE_SECRET_" + re.sub(r"[^A-Za-z0-9]+", "_", where).strip("_").upper()
                env[name] = value
                out[key] = "${oc.env:" + name + "}"
            else:
                out[key], found = lift_secrets(value, where)
                env.update(found)
        return out, env
    if isinstance(tree, list):
        items = [lift_secrets(v, f"{path}_{i}") for i, v in enumerate(tree)]
        for _, found in items:
            env.update(found)
        return [v for v, _ in items], env
    return tree, env


def _live_values() -> list[str]:
    values = [os.environ.get(n) for n in (*SECRET_ENV, *_extra_env)] + list(_extra_values)
    # longest first, so a secret that contains another is masked whole
    return sorted({v for v in values if v and len(v) >= MIN_SECRET_LEN}, key=len, reverse=True)


def redact_text(text: str) -> str:
    for value in _live_values():
        if value in text:
            text = text.replace(value, MASK)
    text = BEARER.sub(lambda m: f"{m.group(1)} {MASK}", text)
    text = URL_PASSWORD.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    return SECRET_VALUE.sub(MASK, text)


def redact_override(item: str) -> str:
    """`+model.engine_args.api-key=abc` -> `+model.engine_args.api-key=***`, then masked as text."""
    key, sep, value = item.partition("=")
    if sep and value and is_secret_key(key.split(".")[-1]):
        return f"{key}={MASK}"
    return redact_text(item)


def redact(obj: Any) -> Any:
    """A copy of a plain dict/list tree with secrets masked."""
    if isinstance(obj, dict):
        return {
            k: (MASK if is_secret_key(k) and v not in (None, "") and not isinstance(v, bool) else redact(v))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def redact_command(args: list[str]) -> str:
    """An engine command line for logs: the value after any secret flag, and known values, masked."""
    out: list[str] = []
    hide_next = False
    for arg in args:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        if arg.startswith("-"):
            name, sep, value = arg.partition("=")
            if is_secret_key(name.lstrip("-")):
                if sep:
                    out.append(f"{name}={MASK}")
                else:
                    out.append(arg)
                    hide_next = True
                continue
        out.append(redact_text(arg))
    return " ".join(out)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            # a traceback's text is rendered later from exc_info: render and mask it now
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class RedactingStream(io.TextIOBase):
    """Wraps sys.stdout / sys.stderr so nothing forge (or a library) prints shows a secret."""

    def __init__(self, inner: TextIO) -> None:
        self.inner = inner

    def write(self, text: str) -> int:
        self.inner.write(redact_text(text))
        return len(text)

    def flush(self) -> None:
        self.inner.flush()

    def isatty(self) -> bool:
        return self.inner.isatty()

    def fileno(self) -> int:
        return self.inner.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.inner, "encoding", "utf-8")


def guard_std_streams() -> None:
    """Mask secrets in everything written to this process's stdout and stderr."""
    import sys

    if not isinstance(sys.stdout, RedactingStream):
        sys.stdout = RedactingStream(sys.stdout)  # type: ignore[assignment]
    if not isinstance(sys.stderr, RedactingStream):
        sys.stderr = RedactingStream(sys.stderr)  # type: ignore[assignment]


# columns that hold diagnostics (a rejected row's reason, its raw input, an error): masked like a
# log line (known values and secret-shaped strings). Every other string column, nested ones
# included, has known values of real-secret length masked: a model's answer is not rewritten for
# looking like a key, nor a word that happens to be a short placeholder key (`EMPTY`, `test`); ids
# are never rewritten (resume matches them against the input).
DIAGNOSTIC_COLUMNS = frozenset({"reason", "row", "value", "error", "errors"})
NEVER_MASKED = frozenset({"id"})
MIN_DATA_SECRET_LEN = 16


def redact_strings(obj: Any) -> Any:
    """A copy of a JSON-like tree (stats, state) with every string masked by `redact_text`; keys
    are left alone (a stats key like `max_tokens` is not a secret)."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: redact_strings(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_strings(v) for v in obj]
    return obj


def redact_table(table: Any) -> Any:
    """The table every Parquet file forge writes goes through (forge/run/output.py write_atomic)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = [v for v in _live_values() if len(v) >= MIN_DATA_SECRET_LEN]
    # one pass of RE2 over each array for all values (a substring search per value costs ~10x)
    anyone = "|".join(re.escape(v) for v in values)

    def walk(arr: Any) -> Any | None:
        """The array with known values masked, or None when nothing in it changed."""
        t = arr.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            if not pc.any(pc.match_substring_regex(arr, anyone)).as_py():
                return None
            hits = [v for v in values if pc.any(pc.match_substring(arr, v)).as_py()]
            for v in hits:
                arr = pc.replace_substring(arr, v, MASK)
            return arr if hits else None
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            if arr.offset and arr.null_count:  # from_arrays takes no null mask with sliced offsets
                arr = pa.concat_arrays([arr])
            child = walk(arr.values)
            if child is None:
                return None
            mask = arr.is_null() if arr.null_count else None
            return type(arr).from_arrays(arr.offsets, child, type=t, mask=mask)
        if pa.types.is_struct(t):
            kids = [arr.field(i) for i in range(t.num_fields)]
            new = [walk(k) for k in kids]
            if all(n is None for n in new):
                return None
            kids = [k if n is None else n for k, n in zip(kids, new, strict=True)]
            return pa.StructArray.from_arrays(kids, fields=list(t), mask=arr.is_null() if arr.null_count else None)
        return None

    columns = []
    changed = False
    for name, col in zip(table.column_names, table.columns, strict=True):
        new = col
        if name in DIAGNOSTIC_COLUMNS and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            masked = [None if x is None else redact_text(x) for x in col.to_pylist()]
            if masked != col.to_pylist():
                new = pa.array(masked, col.type)
        elif values and name not in NEVER_MASKED:
            chunks = [walk(c) for c in col.chunks]
            if any(c is not None for c in chunks):
                new = pa.chunked_array(
                    [c if m is None else m for c, m in zip(col.chunks, chunks, strict=True)], col.type
                )
        changed = changed or new is not col
        columns.append(new)
    return pa.Table.from_arrays(columns, schema=table.schema) if changed else table
