"""The columns a rollout returns. Parquet shards need one type per column, and a user's function
returns plain Python values, so each column's type is declared (`rollout.columns`, a ready
rollout's own, the JSON schema's fields) or taken from its first non-null value, then pinned
for the whole run dir in state/columns.json. A later value of another type quarantines its row
with a reason naming the column — never a failed shard."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from forge.run.output import DATA_SCHEMA, MESSAGE, ROW_COUNTS, write_json_atomic
from forge.schema import ConfigError
from forge.stages.generate.rollout.structured import JSON_TEXT

Kind = pa.DataType | str
# what forge adds to every row (a fn's own column of the same name wins, if of the same type)
HEAD = [("id", pa.string()), ("rollout", pa.int32()), ("output_index", pa.int32())]
KEPT = ROW_COUNTS
# generation's own bookkeeping columns (stats.json and the card read them), as DATA_SCHEMA types them
TAIL = [("requests", pa.int32())] + [
    (f.name, f.type) for f in DATA_SCHEMA if f.name in KEPT or f.name in ("model", "revision", "engine", "metadata")
]
RESERVED = {name for name, _ in HEAD}
FORGES = RESERVED | {name for name, _ in TAIL}  # a JSON schema's field of such a name gets `json_`
NAMED: dict[str, Kind] = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "json": JSON_TEXT,
    "messages": pa.list_(MESSAGE),
    "list<string>": pa.list_(pa.string()),
    "list<int64>": pa.list_(pa.int64()),
    "list<float64>": pa.list_(pa.float64()),
}


def parse_declared(columns: dict[str, str]) -> dict[str, Kind]:
    out: dict[str, Kind] = {}
    for name, kind in columns.items():
        if name in FORGES:
            raise ConfigError(f"rollout.columns.{name}: {name} is forge's own column; pick another name")
        if str(kind) not in NAMED:
            raise ConfigError(f"rollout.columns.{name}: unknown type {kind!r}; one of: {', '.join(NAMED)}")
        out[name] = NAMED[str(kind)]
    return out


def infer(value: Any) -> Kind:
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    if isinstance(value, str):
        return pa.string()
    if isinstance(value, list) and value and all(_is_message(m) for m in value):
        return NAMED["messages"]
    if not isinstance(value, list):
        return JSON_TEXT  # a dict's keys vary from row to row: JSON text, unless declared
    try:
        kind = pa.array([value]).type
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return JSON_TEXT
    item = kind.value_type
    scalar = (
        pa.types.is_string(item) or pa.types.is_integer(item) or pa.types.is_floating(item) or pa.types.is_boolean(item)
    )
    return kind if scalar else JSON_TEXT


def _is_message(m: object) -> bool:
    return isinstance(m, dict) and set(m) <= {"role", "content"} and all(isinstance(v, str | None) for v in m.values())


INT64 = (-(2**63), 2**63 - 1)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800" parses to one): Parquet refuses it
        return False
    return True


def _fits(value: Any, kind: Kind) -> tuple[bool, Any]:
    """(fits, the value as written): checked here, so a shard write never fails on a value."""
    if value is None:
        return True, None
    if kind == JSON_TEXT:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            return False, None
        return _utf8(text), text
    if kind == pa.string():
        return isinstance(value, str) and _utf8(value), value
    if kind == pa.bool_():
        return isinstance(value, bool), value
    if kind in (pa.int64(), pa.int32()):
        if isinstance(value, float) and value.is_integer():  # JSON 3.0 is a valid "integer"
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool) and INT64[0] <= value <= INT64[1]
        return ok, value
    if kind == pa.float64():
        return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e308, value
    try:
        pa.array([value], type=kind)
    except (pa.ArrowException, TypeError, ValueError, OverflowError, UnicodeEncodeError):
        return False, None
    return True, value


def _describe(kind: Kind) -> str:
    return "json" if kind == JSON_TEXT else str(kind)


class ColumnPin:
    """The run dir's output columns: declared ones, then each new one as it first appears."""

    def __init__(self, state_dir: Path, declared: dict[str, Kind]) -> None:
        self.path = state_dir / "columns.json"
        self.lock_path = state_dir / "columns.lock"
        self.declared = declared
        self.kinds: dict[str, Kind] = dict(declared)
        self.tail = dict(TAIL)
        self.version = 0  # bumped when a column is pinned (the writer rebuilds its schema)
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        for name, kind in _decode(json.loads(self.path.read_text())).items():
            self.kinds.setdefault(name, kind)

    def conform(self, row: dict[str, Any]) -> str | None:
        """Fit one row's values to the pinned types, in place; the problem if one does not fit."""
        for name, value in row.items():
            if name in RESERVED:
                continue
            if type(value).__module__ == "numpy" and hasattr(value, "item"):
                value = value.item() if getattr(value, "ndim", 0) == 0 else value.tolist()
            kind = self.kinds.get(name) or self.tail.get(name)
            if kind is None:
                if value is None or value == []:  # nothing to learn a type from yet
                    continue
                kind = self._pin(name, infer(value))
            ok, written = _fits(value, kind)
            if not ok:
                where = "declared" if name in self.declared else "pinned by the run's earlier rows"
                shown = repr(value)[:60]
                return (
                    f"column {name!r} got {type(value).__name__} {shown}, but its type is {_describe(kind)} ({where}); "
                    f"return the same type every time, or declare it: rollout.columns.{name}=json"
                )
            row[name] = written
        return None

    def _pin(self, name: str, kind: Kind) -> Kind:
        """Record a new column for every task of the run dir (the first task to pin it wins)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                with contextlib.suppress(FileNotFoundError):
                    for other, theirs in _decode(json.loads(self.path.read_text())).items():
                        if other not in self.kinds:
                            self.kinds[other] = theirs
                            self.version += 1
                if name not in self.kinds:
                    self.kinds[name] = kind
                    self.version += 1
                    pinned = {k: v for k, v in self.kinds.items() if k not in self.declared}
                    write_json_atomic(self.path, _encode(pinned))
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return self.kinds[name]

    def schema(self) -> pa.Schema:
        fields = list(HEAD)
        fields += [(n, pa.string() if k == JSON_TEXT else k) for n, k in self.kinds.items() if n not in self.tail]
        fields += [(n, self.kinds.get(n, k)) for n, k in TAIL]
        return pa.schema([(n, pa.string() if k == JSON_TEXT else k) for n, k in fields])


def _encode(kinds: dict[str, Kind]) -> dict[str, Any]:
    arrow = pa.schema([(n, k) for n, k in kinds.items() if k != JSON_TEXT])
    return {
        "order": list(kinds),
        "json": [n for n, k in kinds.items() if k == JSON_TEXT],
        "arrow": base64.b64encode(arrow.serialize().to_pybytes()).decode(),
    }


def _decode(data: dict[str, Any]) -> dict[str, Kind]:
    arrow = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(data["arrow"])))
    types = {f.name: f.type for f in arrow}
    return {n: (JSON_TEXT if n in data["json"] else types[n]) for n in data["order"]}


def harmonize_shards(out_dir: Path) -> int:
    """At the end of a rollout run: give every data/ shard the run's full column set (a column
    first seen in a later shard is null in the earlier ones), so readers that take the first
    shard's schema (`datasets`, pyarrow) see every column. Each shard is rewritten atomically,
    only if it lacks a column. Returns the shards rewritten."""
    import pyarrow.parquet as pq

    from forge.run.output import shard_files, write_atomic

    if not (out_dir / "state" / "columns.json").exists():
        return 0
    files = shard_files(out_dir / "data")
    schemas = [pq.read_schema(f) for f in files]
    if not schemas:
        return 0
    full = max(schemas, key=len)
    for schema in schemas:
        for f in schema:
            if full.get_field_index(f.name) < 0:
                full = full.insert(len(full) - len(TAIL), f)
    rewritten = 0
    for path, schema in zip(files, schemas, strict=True):
        if set(schema.names) == set(full.names):
            continue
        table = pq.read_table(path)
        for f in full:
            if table.schema.get_field_index(f.name) < 0:
                table = table.append_column(f, pa.nulls(table.num_rows, f.type))
        write_atomic(path, table.select(full.names))
        rewritten += 1
    return rewritten
