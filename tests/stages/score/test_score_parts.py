"""forge/stages/score pieces without a model: windows cover every target once, runs of the mask are the
assistant turns, a checkpoint's pooling mode is read from its sentence-transformers config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from forge.stages.score.backends import _groups, pooling_mode
from forge.stages.score.stage import turn_runs, view_text, windows


@pytest.mark.parametrize(("length", "size", "overlap"), [(10, 64, 16), (64, 64, 16), (65, 64, 16), (500, 64, 0)])
def test_windows_score_each_target_once_with_context(length: int, size: int, overlap: int) -> None:
    parts = windows(length, size, overlap)
    targets = [t for a, b, first in parts for t in range(first, b)]
    assert targets == list(range(1, length))  # every target once, in order
    assert all(b - a <= size for a, b, _ in parts)
    assert all(first - a >= overlap for a, _, first in parts[1:])  # later windows repeat context


def test_turn_runs_are_the_runs_of_ones() -> None:
    assert turn_runs(np.array([0, 1, 1, 0, 0, 1, 0, 1], dtype=np.uint8)) == [(1, 3), (5, 6), (7, 8)]
    assert turn_runs(np.zeros(4, dtype=np.uint8)) == [] and turn_runs(np.array([], dtype=np.uint8)) == []


def test_groups_stay_within_the_token_budget() -> None:
    lengths = [5, 100, 7, 60, 60, 3]
    groups = _groups(lengths, 128)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert all(max(lengths[i] for i in g) * len(g) <= 128 or len(g) == 1 for g in groups)


def test_pooling_mode_follows_the_checkpoint(tmp_path: Path) -> None:
    assert pooling_mode(str(tmp_path)) == "last"  # vLLM's default for a decoder
    (tmp_path / "1_Pooling").mkdir()
    for key, mode in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls")):
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({key: True}))
        assert pooling_mode(str(tmp_path)) == mode


def test_views_of_a_chat() -> None:
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "text": None}
    assert view_text(row, "user") == "q" and view_text(row, "assistant") == "a"
    assert view_text(row, "conversation") == "user: q\n\nassistant: a"
    assert view_text({"text": "doc"}, "user") == "doc"


def test_pool_expressions_are_checked_before_any_row_is_scored() -> None:
    import pyarrow as pa

    from forge.schema import ConfigError
    from forge.stages.score.report import check_pools

    schema = pa.schema([("nll_mean", pa.float64()), ("n_scored_tokens", pa.int64())])
    check_pools({"low": "nll_mean <= quantile(0.25) and n_scored_tokens > 10"}, schema)
    for expression, why in (
        ("nll_mean <= quantile(2)", r"quantile\(2\): q must be in \[0, 1\]"),
        ("nll_mean <= quantile(x)", "needs a number q"),
        ("nll_mea > 3", "score.pools.bad: `nll_mea > 3`"),
        ("nll_mean <=", "score.pools.bad: invalid syntax"),
    ):
        with pytest.raises(ConfigError, match=why):
            check_pools({"bad": expression}, schema)


def test_only_an_engine_in_this_process_can_score() -> None:
    from forge.engine.config import EngineKind
    from forge.schema import ConfigError
    from forge.stages.score.backends import check_engine

    for ok in (EngineKind.transformers, EngineKind.vllm, EngineKind.vllm_async):
        check_engine(ok)
    with pytest.raises(ConfigError, match="model.engine=endpoint: pipeline=score runs the model in this process"):
        check_engine(EngineKind.endpoint)
