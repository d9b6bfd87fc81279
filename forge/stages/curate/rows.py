"""The one schema every curated row has, whatever shape its source was in.

A normalized row is a plain dict with the keys of CURATED_SCHEMA. Chats carry `messages` (and
`text` null); plain documents carry `text` (and `messages` null). `meta_*` columns come from the
per-source field maps in conf/dataset (never from code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import xxhash

CURATED_MESSAGE = pa.struct(
    [
        ("role", pa.string()),
        ("content", pa.string()),
        ("reasoning", pa.string()),  # the turn's reasoning / thinking, where the source has it
        ("tool_calls", pa.string()),  # the turn's tool calls as JSON text, where the source has them
    ]
)
SOURCE = pa.struct([("dataset", pa.string()), ("config", pa.string()), ("split", pa.string()), ("id", pa.string())])
CURATED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # hash of the normalized content (stable across runs and machines)
        ("messages", pa.list_(CURATED_MESSAGE)),
        ("text", pa.string()),
        ("source", SOURCE),
        ("num_turns", pa.int32()),
        ("has_tool_calls", pa.bool_()),
        ("has_reasoning", pa.bool_()),
        ("meta_correctness", pa.float64()),  # 0-1
        ("meta_difficulty_bin", pa.int64()),  # 0 = easiest
        ("meta_domain", pa.string()),
    ]
)
TYPED_META = {"meta_correctness", "meta_difficulty_bin", "meta_domain"}
ROLES = ("system", "user", "assistant", "tool")


def curated_schema(extra_meta: list[str] | tuple[str, ...] = ()) -> pa.Schema:
    """CURATED_SCHEMA plus string columns for any other `meta_*` a source's field map declares."""
    schema = CURATED_SCHEMA
    for name in sorted(set(extra_meta) - TYPED_META):
        schema = schema.append(pa.field(name, pa.string()))
    return schema


class Unnormalizable(ValueError):
    """A row that cannot be brought into the schema; the message is the reason kept in rejected/."""


@dataclass
class Removal:
    """Why a filter removed a row: the filter's name, the reason and the value that failed."""

    filter: str
    reason: str
    value: Any = None


def content_id(messages: list[dict[str, Any]] | None, text: str | None) -> str:
    """The row id: a hash of the normalized content only (not of the source or position), so the
    same conversation gets the same id in every run and every mix."""
    h = xxhash.xxh3_128()
    if messages is not None:
        for m in messages:
            for key in ("role", "content", "reasoning", "tool_calls"):
                value = m.get(key)
                h.update(b"\x00" if value is None else b"\x01" + str(value).encode("utf-8", "surrogatepass"))
            h.update(b"\x1e")
    else:
        h.update(b"\x02" + (text or "").encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def row_text(row: dict[str, Any]) -> str:
    """The text a document filter sees: a document's text, or a chat's turns joined by blank lines."""
    if row.get("text") is not None:
        return row["text"]
    return "\n\n".join(m.get("content") or "" for m in row.get("messages") or [])


BAD_UNICODE = "invalid Unicode: a lone surrogate (such as \\ud800) that no file can hold"


def kept_table(
    kept: list[tuple[dict[str, Any], Any]],
    schema: pa.Schema,
    sources: list[Any],
    rejected: list[dict[str, Any]],
    by_source: dict[str, dict[str, Any]],
    by_filter: dict[str, int],
) -> pa.Table:
    """The kept (row, mixed row) pairs of a batch as one table. A string no file can hold (a lone
    surrogate that json let through as `"\\ud800"`) fails the whole batch in Arrow: then each row
    is tried alone, and those that fail move to `rejected` (step `normalize`) and their counts."""
    from forge.run.batch import reject_row

    try:
        return pa.Table.from_pylist([r for r, _ in kept], schema=schema)
    except UnicodeEncodeError:
        pass
    good = []
    for row, mr in kept:
        try:
            pa.Table.from_pylist([row], schema=schema)
        except UnicodeEncodeError:
            label = sources[mr.source].label
            rejected.append(reject_row(mr, label, "normalize", BAD_UNICODE, None, row["id"]))
            counts = by_source[label]
            counts["rows_kept"] -= 1
            counts["chars_kept"] -= len(row_text(row))
            counts["removed"]["normalize"] = counts["removed"].get("normalize", 0) + 1
            by_filter["normalize"] = by_filter.get("normalize", 0) + 1
            continue
        good.append(row)
    return pa.Table.from_pylist(good, schema=schema)
