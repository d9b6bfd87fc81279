"""Pools: named subsets of the kept rows, each a boolean expression over columns
(`meta_correctness >= 0.8`, `has_tool_calls`, `meta_domain == 'math' and num_turns <= 4`).

An expression is parsed with Python's `ast` and turned into an Arrow compute expression, so a pool
is one vectorized filter per batch. Only names of columns, constants, comparisons (including
`in` / `not in` a list), `and` / `or` / `not`, and `is None` / `is not None` are allowed; anything
else is a config error naming the pool.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from forge.schema import ConfigError

POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_COMPARE = {
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
}


class PoolError(ValueError):
    pass


def _constant(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        return -node.operand.value
    if isinstance(node, ast.List | ast.Tuple | ast.Set):
        return [_constant(e) for e in node.elts]
    raise PoolError(f"expected a constant, got `{ast.unparse(node)}`")


def _field(node: ast.AST, columns: set[str]) -> pc.Expression:
    if isinstance(node, ast.Name):
        if node.id not in columns:
            raise PoolError(f"no column {node.id!r}; columns: {', '.join(sorted(columns))}")
        return pc.field(node.id)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "source":
        if node.attr not in ("dataset", "config", "split", "id"):
            raise PoolError(f"source has no field {node.attr!r} (dataset, config, split, id)")
        return pc.field("source", node.attr)
    raise PoolError(f"expected a column name, got `{ast.unparse(node)}`")


def _side(node: ast.AST, columns: set[str]) -> Any:
    if isinstance(node, ast.Name | ast.Attribute):
        return _field(node, columns)
    return _constant(node)


def _compile(node: ast.AST, columns: set[str]) -> pc.Expression:
    if isinstance(node, ast.BoolOp):
        parts = [_compile(v, columns) for v in node.values]
        out = parts[0]
        for p in parts[1:]:
            out = (out & p) if isinstance(node.op, ast.And) else (out | p)
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ~_compile(node.operand, columns)
    if isinstance(node, ast.Name | ast.Attribute):  # a boolean column on its own: `has_tool_calls`
        return _field(node, columns) == True  # noqa: E712 (an Arrow expression, not a Python bool)
    if isinstance(node, ast.Constant) and isinstance(node.value, bool):
        return pc.scalar(node.value)
    if isinstance(node, ast.Compare):
        out = None
        left = node.left
        for op, right in zip(node.ops, node.comparators, strict=True):
            a, b = _side(left, columns), _side(right, columns)
            if isinstance(op, ast.In | ast.NotIn):
                if not isinstance(a, pc.Expression) or not isinstance(b, list):
                    raise PoolError(f"`in` needs a column on the left and a list on the right: `{ast.unparse(node)}`")
                part = a.isin(b)
                part = ~part if isinstance(op, ast.NotIn) else part
            elif isinstance(op, ast.Is | ast.IsNot) and b is None and isinstance(a, pc.Expression):
                part = a.is_null() if isinstance(op, ast.Is) else a.is_valid()
            elif type(op) in _COMPARE:
                if not isinstance(a, pc.Expression) and not isinstance(b, pc.Expression):
                    raise PoolError(f"compares two constants: `{ast.unparse(node)}`")
                part = _COMPARE[type(op)](a, b)
            else:
                raise PoolError(f"operator not allowed: `{ast.unparse(node)}`")
            out = part if out is None else out & part
            left = right
        return out
    raise PoolError(f"not allowed in a pool expression: `{ast.unparse(node)}`")


def compile_pools(pools: dict[str, str], schema: pa.Schema, key: str = "curate.pools") -> dict[str, pc.Expression]:
    """Each pool's expression, checked against the output schema; errors name the pool (under
    `key`: the stage's own pools knob)."""
    prefix = key
    columns = set(schema.names)
    seen: dict[str, str] = {}
    out = {}
    for name, expression in pools.items():
        key = f"{prefix}.{name}"
        if not POOL_NAME.match(str(name)):
            raise ConfigError(f"{key}: a pool name is a folder name: letters, digits, _ . - (got {name!r})")
        folded = str(name).lower()
        if folded in seen:
            raise ConfigError(f"{key}: the pool name is used twice (also as {seen[folded]!r}); pool names must differ")
        seen[folded] = name
        if not isinstance(expression, str) or not expression.strip():
            raise ConfigError(f"{key}: needs an expression over columns, such as `meta_correctness >= 0.8`")
        try:
            tree = ast.parse(expression.strip(), mode="eval")
            out[name] = _compile(tree.body, columns)
            schema.empty_table().filter(out[name])  # types checked now, not mid-run: `meta_domain >= 3`
        except SyntaxError as exc:
            raise ConfigError(f"{key}: `{expression}` is not a valid expression ({exc.msg})") from None
        except (PoolError, pa.ArrowException, TypeError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{key}: `{expression}`: {why}") from None
    return out


def pool_tables(kept: pa.Table, pools: dict[str, pc.Expression]) -> dict[str, pa.Table]:
    """The kept rows of each pool, as output names (`pools/<name>`) -> tables."""
    return {f"pools/{name}": kept.filter(expr) for name, expr in pools.items()}
