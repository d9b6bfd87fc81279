"""generation.json_schema: loading (file, inline, errors as one line), validation of answers,
what each engine is sent, and the column types an object schema gives."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from forge.engine.config import EngineKind
from forge.schema import ConfigError
from forge.stages.generate.rollout.structured import JSON_TEXT, load_schema

REPO = Path(__file__).resolve().parents[4]


def test_bundled_schema_loads_from_any_working_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    schema = load_schema("conf/schema/qa.json")
    assert schema.origin == "conf/schema/qa.json"
    assert schema.columns() == {"question": pa.string(), "answer": pa.string(), "difficulty": pa.int64()}


def test_answers_are_parsed_and_validated() -> None:
    schema = load_schema(str(REPO / "conf/schema/qa.json"))
    good = {"question": "q", "answer": "a", "difficulty": 3}
    assert schema.check(json.dumps(good)) == (good, None)
    assert schema.check("```json\n" + json.dumps(good) + "\n```")[0] == good
    value, why = schema.check(json.dumps({**good, "difficulty": "hard"}))
    assert value is None and why == "$.difficulty: 'hard' is not of type 'integer'"
    value, why = schema.check('{"question": "q"')
    assert value is None and why.startswith("not JSON (")
    assert "required property" in schema.check('{"question": "q", "answer": "a"}')[1]


def test_inline_and_bad_schemas(tmp_path: Path) -> None:
    assert load_schema('{"type": "integer"}').check("4") == (4, None)
    assert load_schema(
        {"type": "object", "properties": {"x": {"type": "array", "items": {"type": "number"}}}}
    ).columns() == {"x": pa.list_(pa.float64())}
    assert load_schema({"type": "object", "properties": {"o": {"type": "object"}}}).columns() == {"o": JSON_TEXT}
    with pytest.raises(ConfigError, match=r"^generation.json_schema: cannot read nope.json"):
        load_schema("nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="is not JSON"):
        load_schema(str(bad))
    with pytest.raises(ConfigError, match=r"not a valid JSON Schema at type: 'strin' is not valid"):
        load_schema({"type": "strin"})
    assert load_schema(None) is None


def test_what_each_engine_is_sent() -> None:
    schema = load_schema('{"type": "object"}')
    for engine in (EngineKind.vllm, EngineKind.sglang, EngineKind.endpoint):
        fmt = schema.request_fields(engine)["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == {"type": "object"}
    assert schema.request_fields(EngineKind.vllm_async) == {"structured_outputs": {"json": {"type": "object"}}}
    assert schema.request_fields(EngineKind.transformers) == {}  # cannot guide: validated only
