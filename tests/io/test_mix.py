"""forge/io/mix.py: weighted sampling of sources to a target, deterministic and streaming."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import write_jsonl

from forge.config import DatasetConfig, SourceSpec
from forge.io.dataset import DatasetError
from forge.io.mix import expected_rows, open_mix
from forge.schema import ConfigError


def _sources(tmp_path: Path, sizes: dict[str, int], weights: dict[str, float]) -> list[SourceSpec]:
    specs = []
    for name, n in sizes.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [{"text": f"{name} {i}"} for i in range(n)])
        specs.append(SourceSpec(name=str(path), label=name, weight=weights[name], format="text"))
    return specs


def _counts(mix, tasks: int = 1) -> Counter:
    out: Counter = Counter()
    for t in range(tasks):
        for r in mix.rows(t, tasks):
            out[mix.sources[r.source].label] += 1
    return out


def test_target_rows_split_by_weight_with_up_and_down_sampling(tmp_path: Path) -> None:
    specs = _sources(tmp_path, {"a": 1000, "b": 100}, {"a": 1, "b": 3})
    mix = open_mix(DatasetConfig(sources=specs, target_rows=800))
    counts = _counts(mix)
    assert abs(counts["a"] - 200) < 40 and abs(counts["b"] - 600) < 10  # b: 100 rows read 6 times
    assert mix.requested == {"a": 0.25, "b": 0.75}
    copies = Counter(r.copy for r in mix.rows() if r.source == 1)
    assert copies[0] == 100 and max(copies) == 5
    assert expected_rows(mix) == pytest.approx(800, abs=1)


def test_temperature_flattens_and_the_seed_decides_which_rows(tmp_path: Path) -> None:
    specs = _sources(tmp_path, {"a": 2000, "b": 2000}, {"a": 9, "b": 1})
    hot = open_mix(DatasetConfig(sources=specs, target_rows=1000, temperature=2.0))
    assert hot.requested == {"a": 0.75, "b": 0.25}  # 9^0.5 : 1^0.5
    picked = [(r.source, r.row.index) for r in hot.rows()]
    again = [
        (r.source, r.row.index)
        for r in open_mix(DatasetConfig(sources=specs, target_rows=1000, temperature=2.0)).rows()
    ]
    other = [
        (r.source, r.row.index)
        for r in open_mix(DatasetConfig(sources=specs, target_rows=1000, temperature=2.0, seed=1)).rows()
    ]
    assert picked == again and picked != other


def test_shards_split_the_stream_without_overlap(tmp_path: Path) -> None:
    specs = _sources(tmp_path, {"a": 300, "b": 50}, {"a": 1, "b": 1})
    mix = open_mix(DatasetConfig(sources=specs, target_rows=200))
    whole = [r.index for r in mix.rows()]
    parts = [r.index for t in range(3) for r in mix.rows(t, 3)]
    assert sorted(parts) == whole


def test_without_a_target_every_row_is_read_once(tmp_path: Path) -> None:
    specs = _sources(tmp_path, {"a": 30, "b": 20}, {"a": 5, "b": 1})
    mix = open_mix(DatasetConfig(sources=specs))
    assert _counts(mix) == {"a": 30, "b": 20}
    specs[1].max_rows = 7
    assert _counts(open_mix(DatasetConfig(sources=specs))) == {"a": 30, "b": 7}


def test_target_tokens_counts_characters(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x" * 396} for _ in range(100)])  # ~100 tokens a row
    mix = open_mix(DatasetConfig(sources=[SourceSpec(name=str(path), format="text")], target_tokens=5000))
    assert 35 <= sum(1 for _ in mix.rows()) <= 65


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weight": 0}, "dataset.sources[1].weight: must be > 0"),
        ({"weight": -1}, "dataset.sources[1].weight: must be > 0"),
        ({"label": "a"}, "dataset.sources[1].label: 'a' is also the label of dataset.sources[0]"),
    ],
)
def test_bad_sources_name_their_key(tmp_path: Path, change: dict, message: str) -> None:
    specs = _sources(tmp_path, {"a": 5, "b": 5}, {"a": 1, "b": 1})
    for k, v in change.items():
        setattr(specs[1], k, v)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        open_mix(DatasetConfig(sources=specs, target_rows=5))


def test_a_missing_source_is_named(tmp_path: Path) -> None:
    specs = _sources(tmp_path, {"a": 5}, {"a": 1}) + [SourceSpec(name=str(tmp_path / "gone.jsonl"), label="gone")]
    with pytest.raises(DatasetError, match=r"dataset.sources\[1\] \(gone\)"):
        open_mix(DatasetConfig(sources=specs))


def test_bad_targets(tmp_path: Path) -> None:
    specs = _sources(tmp_path, {"a": 5}, {"a": 1})
    with pytest.raises(ConfigError, match="dataset.temperature"):
        open_mix(DatasetConfig(sources=specs, temperature=0))
    with pytest.raises(ConfigError, match="dataset.target_rows"):
        open_mix(DatasetConfig(sources=specs, target_rows=0))
    with pytest.raises(ConfigError, match="set one of them"):
        open_mix(DatasetConfig(sources=specs, target_rows=5, target_tokens=5))


def test_a_tiny_temperature_gives_the_heaviest_source_everything(tmp_path: Path) -> None:
    specs = _sources(tmp_path, {"a": 50, "b": 50}, {"a": 3, "b": 2})
    mix = open_mix(DatasetConfig(sources=specs, target_rows=40, temperature=0.001))
    assert mix.requested == {"a": 1.0, "b": 0.0}
