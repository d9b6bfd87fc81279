"""A rollout's columns: declared or pinned by their first values, kept for the whole run dir
(also by another task), and a value of another type is one reason naming the column."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from forge.schema import ConfigError
from forge.stages.generate.rollout.columns import ColumnPin, parse_declared


def test_first_values_pin_the_types_for_every_task(tmp_path: Path) -> None:
    pin = ColumnPin(tmp_path, {})
    row = {
        "id": "a",
        "rollout": 0,
        "output_index": 0,
        "score": 3,
        "tags": ["x"],
        "note": None,
        "meta": {"k": [1, None]},
    }
    assert pin.conform(row) is None
    other = ColumnPin(tmp_path, {})  # another task, later: the same types
    schema = other.schema()
    assert schema.field("score").type == pa.int64() and schema.field("tags").type == pa.list_(pa.string())
    assert "note" not in schema.names  # only ever null so far: not pinned
    assert schema.field("meta").type == pa.string() and row["meta"] == '{"k": [1, null]}'  # mixed: JSON text
    why = other.conform({"score": "high"})
    assert why.startswith("column 'score' got str 'high', but its type is int64 (pinned by the run's earlier rows)")
    assert "rollout.columns.score=json" in why
    assert other.conform({"score": None}) is None


def test_declared_types_and_errors(tmp_path: Path) -> None:
    pin = ColumnPin(tmp_path, parse_declared({"x": "float64", "blob": "json", "turns": "messages"}))
    row = {"x": 2, "blob": {"a": 1}, "turns": [{"role": "user", "content": "hi"}]}
    assert pin.conform(row) is None and row["blob"] == '{"a": 1}'
    assert "(declared)" in pin.conform({"x": "2"})
    assert pin.conform({"turns": [{"role": "user", "content": 3}]}) is not None
    with pytest.raises(ConfigError, match=r"^rollout.columns.x: unknown type 'int'; one of: string, int64"):
        parse_declared({"x": "int"})
    with pytest.raises(ConfigError, match=r"^rollout.columns.id: id is forge's own column"):
        parse_declared({"id": "string"})


def test_bool_is_not_an_int(tmp_path: Path) -> None:
    pin = ColumnPin(tmp_path, {})
    assert pin.conform({"n": 1}) is None
    assert pin.conform({"n": True}) is not None
    assert pin.conform({"ok": True}) is None and pin.conform({"ok": 1}) is not None


def test_numpy_values_are_plain_values(tmp_path: Path) -> None:
    import numpy as np

    pin = ColumnPin(tmp_path, {})
    row = {"n": np.int64(3), "v": np.array([1.5, 2.0]), "f": np.float32(0.5)}
    assert pin.conform(row) is None
    assert row == {"n": 3, "v": [1.5, 2.0], "f": 0.5}
    assert pin.schema().field("v").type == pa.list_(pa.float64())


def test_a_rollout_file_path_loads_with_its_setup(tmp_path: Path) -> None:
    from forge.stages.generate.rollout.checks import rollout_fn, setup_fn
    from forge.stages.generate.rollout.config import RolloutConfig

    (tmp_path / "my_rollout_file.py").write_text(
        "def setup(ctx):\n    return 1\n\nasync def fn(row, generate, ctx):\n    return {}\n"
    )
    cfg = RolloutConfig(fn=f"{tmp_path}/my_rollout_file.py:fn")
    assert rollout_fn(cfg).__name__ == "fn" and setup_fn(cfg)(None) == 1


def test_a_late_column_is_added_to_earlier_shards_at_the_end(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from forge.run.output import write_atomic
    from forge.stages.generate.rollout.columns import harmonize_shards

    pin = ColumnPin(tmp_path / "state", {})
    first = {"id": "a", "rollout": 0, "output_index": 0, "x": 1}
    assert pin.conform(first) is None
    (tmp_path / "data").mkdir()
    write_atomic(tmp_path / "data" / "00000_00000.parquet", pa.Table.from_pylist([first], schema=pin.schema()))
    second = {"id": "b", "rollout": 0, "output_index": 0, "x": 2, "late": "yes"}
    assert pin.conform(second) is None
    write_atomic(tmp_path / "data" / "00000_00001.parquet", pa.Table.from_pylist([second], schema=pin.schema()))
    assert harmonize_shards(tmp_path) == 1
    table = pq.read_table(tmp_path / "data" / "00000_00000.parquet")
    assert table.schema == pq.read_schema(tmp_path / "data" / "00000_00001.parquet")
    assert table.column("late").to_pylist() == [None] and table.column("x").to_pylist() == [1]
    assert harmonize_shards(tmp_path) == 0


def test_values_parquet_would_refuse_are_the_rows_problem(tmp_path: Path) -> None:
    pin = ColumnPin(tmp_path, parse_declared({"blob": "json"}))
    assert pin.conform({"s": "ok", "n": 1, "whole": 2}) is None
    assert "column 's' got str" in pin.conform({"s": "lone \ud800 surrogate"})  # JSON "\ud800" parses to this
    assert "column 'n' got int" in pin.conform({"n": 2**70})
    assert pin.conform({"blob": {"k": "\udfff"}}) is not None
    row = {"whole": 3.0}  # a JSON schema's "integer" accepts 3.0
    assert pin.conform(row) is None and row["whole"] == 3 and isinstance(row["whole"], int)
    assert pin.conform({"empty": []}) is None and "empty" not in pin.schema().names  # no type learnt yet


def test_schema_fields_named_like_forges_columns_get_a_prefix() -> None:
    from forge.stages.generate.rollout.library import json_field

    assert json_field("id", {}) == "json_id" and json_field("prompt_tokens", {}) == "json_prompt_tokens"
    assert json_field("text", {"text": 1}) == "json_text" and json_field("question", {"text": 1}) == "question"
