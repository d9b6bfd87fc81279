"""Structured outputs (`generation.json_schema`): the schema is loaded and checked once, asked
of the engine in the form it understands, and every answer is parsed and validated here — also
where the engine guided the decoding, since a cut-off answer (max_tokens) is still invalid."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, best_match

from forge.engine.config import EngineKind
from forge.schema import ConfigError

FENCE = re.compile(r"^\s*```(?:json|JSON)?\s*\n?(.*?)\n?\s*```\s*$", re.S)
HTTP_GUIDED = (EngineKind.vllm, EngineKind.sglang, EngineKind.endpoint)
JSON_TEXT = "json"  # a column whose values are written as JSON text (objects, mixed types)


@dataclass(frozen=True)
class JsonSchema:
    schema: dict[str, Any]
    validator: Draft202012Validator
    origin: str  # the file it came from, or "inline"

    def check(self, text: str) -> tuple[Any, str | None]:
        """(parsed value, None) or (None, why it does not match): `$.answer: 'x' is not of type 'integer'`."""
        body = text.strip()
        fenced = FENCE.match(body)
        if fenced:  # models wrap JSON in ``` fences even when asked not to
            body = fenced.group(1).strip()
        try:
            value = json.loads(body)
        except ValueError as exc:
            shown = body[:80] + ("…" if len(body) > 80 else "")
            return None, f"not JSON ({exc.msg} at character {exc.pos}): {shown!r}"
        error = best_match(self.validator.iter_errors(value))
        if error is not None:
            return None, f"{error.json_path}: {error.message}"
        return value, None

    def request_fields(self, engine: EngineKind) -> dict[str, Any]:
        """What the engine is sent to guide its decoding (nothing where it cannot: the CPU engine)."""
        if engine in HTTP_GUIDED:
            return {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "forge_schema", "schema": self.schema},
                }
            }
        if engine == EngineKind.vllm_async:
            return {"structured_outputs": {"json": self.schema}}
        return {}

    def columns(self) -> dict[str, pa.DataType | str]:
        """The Arrow type of each top-level property (an object schema's fields become columns)."""
        props = self.schema.get("properties") if self.schema.get("type") == "object" else None
        return {name: arrow_type(sub) for name, sub in (props or {}).items()}


def arrow_type(schema: Any) -> pa.DataType | str:
    """A JSON Schema's Arrow column type; anything nested or mixed is kept as JSON text."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if isinstance(schema, dict) and "enum" in schema and kind is None:
        values = schema["enum"]
        kind = "string" if all(isinstance(v, str) for v in values) else None
    simple = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}
    if kind in simple:
        return simple[kind]
    if kind == "array":
        item = arrow_type(schema.get("items", {}))
        return pa.list_(item) if item != JSON_TEXT else JSON_TEXT
    return JSON_TEXT


def load_schema(value: Any, base: Path | None = None) -> JsonSchema | None:
    """`generation.json_schema`: a path to a .json file, a JSON string, or an inline mapping."""
    if value is None or value == "":
        return None
    origin = "inline"
    if isinstance(value, str) and not value.lstrip().startswith("{"):
        path = Path(value).expanduser()
        # conf/schema/*.json of forge itself ($FORGE_CONF_DIR's parent when set, as for conf/)
        conf = os.environ.get("FORGE_CONF_DIR")
        base = base or (Path(conf).resolve().parent if conf else Path(__file__).resolve().parents[4])
        if not path.is_absolute() and not path.exists() and (base / path).exists():
            path = base / path
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"generation.json_schema: cannot read {value}: {exc.strerror or exc}") from None
        origin = str(value)
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"generation.json_schema: {value} is not JSON ({exc})") from None
    elif isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"generation.json_schema: the inline schema is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"generation.json_schema: a schema is a JSON object, not {type(value).__name__}")
    try:
        Draft202012Validator.check_schema(value)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "the top level"
        raise ConfigError(
            f"generation.json_schema ({origin}): not a valid JSON Schema at {where}: {exc.message}"
        ) from None
    return JsonSchema(value, Draft202012Validator(value), origin)
