"""The `meta_*` columns: per-source field maps (conf/dataset YAML) that read labels off a row.

Labels come from config, never from code, because every dataset spells them differently:
`{correctness: {column: is_correct, map: {true: 1.0, false: 0.0}}}`, `{correctness: {column: score,
scale: 10}}`, `{difficulty_bin: {column: rating, bins: [3, 6]}}`, `{domain: {value: math}}`,
`{anything: {column: c}}` (a string column `meta_anything`). A row without the column gets null; a
value that cannot be read (not in the map, outside [0, 1], not a number) makes the row Unnormalizable,
and a map that can never work is a ConfigError when the stage is built (check_spec), before any
row is read.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from forge.schema import ConfigError
from forge.stages.curate.rows import Unnormalizable

META_OPTIONS = {
    "correctness": {"column", "value", "map", "scale"},
    "difficulty_bin": {"column", "value", "map", "bins"},
    "domain": {"column", "value", "map"},
}
OTHER_META_OPTIONS = {"column", "value", "map"}
_SORTED = orjson.OPT_SORT_KEYS


def check_meta(meta: Any, key: str) -> None:
    """Raise ConfigError naming `key.meta...` for a meta map forge cannot use."""
    if not isinstance(meta, Mapping):
        raise ConfigError(f"{key}.meta: must be a mapping {{kind: {{column: ...}}}} (got {type(meta).__name__})")
    for kind, opts in meta.items():
        compile_meta(kind, opts, f"{key}.meta.{kind}")


def meta_name(kind: Any) -> str:
    """The column a meta kind fills: `meta_<kind>` (a kind already spelled meta_x stays as is)."""
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


def compile_meta(kind: Any, opts: Any, key: str):
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
                if number is None or not number.is_integer() or not 0 <= number < 2**63:
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
