"""forge/stages/curate/pools.py: pool expressions become vectorized Arrow filters; bad ones name the pool."""

from __future__ import annotations

import pyarrow as pa
import pytest

from forge.schema import ConfigError
from forge.stages.curate.pools import compile_pools, pool_tables
from forge.stages.curate.rows import CURATED_SCHEMA


def _table() -> pa.Table:
    rows = [
        {
            "id": "a",
            "meta_correctness": 0.9,
            "has_tool_calls": True,
            "meta_domain": "math",
            "num_turns": 2,
            "source": {"dataset": "x"},
        },
        {
            "id": "b",
            "meta_correctness": 0.5,
            "has_tool_calls": False,
            "meta_domain": "code",
            "num_turns": 6,
            "source": {"dataset": "y"},
        },
        {
            "id": "c",
            "meta_correctness": None,
            "has_tool_calls": False,
            "meta_domain": "math",
            "num_turns": 4,
            "source": {"dataset": "x"},
        },
    ]
    return pa.Table.from_pylist(rows, schema=CURATED_SCHEMA)


@pytest.mark.parametrize(
    ("expression", "ids"),
    [
        ("meta_correctness >= 0.8", ["a"]),
        ("has_tool_calls", ["a"]),
        ("not has_tool_calls", ["b", "c"]),
        ("meta_domain == 'math'", ["a", "c"]),
        ("meta_domain == 'math' and num_turns > 2", ["c"]),
        ("meta_domain in ['code', 'science'] or meta_correctness > 0.85", ["a", "b"]),
        ("meta_correctness is None", ["c"]),
        ("2 <= num_turns < 6", ["a", "c"]),
        ("source.dataset == 'y'", ["b"]),
    ],
)
def test_expressions_select_rows(expression: str, ids: list[str]) -> None:
    pools = compile_pools({"p": expression}, CURATED_SCHEMA)
    out = pool_tables(_table(), pools)["pools/p"]
    assert out.column("id").to_pylist() == ids


@pytest.mark.parametrize(
    ("pools", "message"),
    [
        ({"p": "meta_corectness > 1"}, "curate.pools.p: .*no column 'meta_corectness'"),
        ({"p": "meta_correctness >"}, "curate.pools.p: .*not a valid expression"),
        ({"p": "__import__('os').system('x')"}, "curate.pools.p: .*not allowed"),
        ({"p": ""}, "curate.pools.p: needs an expression"),
        ({"High": "has_tool_calls", "high": "has_tool_calls"}, "curate.pools.high: the pool name is used twice"),
        ({"a/b": "has_tool_calls"}, "curate.pools.a/b: a pool name is a folder name"),
        ({"p": "meta_domain >= 3"}, "curate.pools.p: .*no kernel matching input types \\(string"),
        ({"p": "num_turns"}, "curate.pools.p: .*no kernel"),
        ({"p": "source == 'x'"}, "curate.pools.p: .*no kernel"),
    ],
)
def test_bad_pools_are_config_errors_naming_the_pool(pools: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compile_pools(pools, CURATED_SCHEMA)
