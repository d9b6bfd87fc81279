"""forge/stages/curate/stage.py: batches in, batches out — no engine, no run dir."""

from __future__ import annotations

from pathlib import Path

from forge.config import DatasetConfig, ForgeConfig, SourceSpec
from forge.io.dataset import SourceRow
from forge.io.mix import Mix, MixedRow, MixSource, open_mix
from forge.stages.curate.stage import CurateStage
from forge.stages.curate.tiny_mix import write_tiny_mix

BUNDLED = Path(__file__).resolve().parents[3] / "forge" / "data" / "mix_tiny"


def _stage(tmp_path: Path, pools: dict | None = None, filters: list | None = None, spec: SourceSpec | None = None):
    cfg = ForgeConfig()
    cfg.curate.pools = pools or {}
    if filters is not None:
        cfg.curate.filters = filters
    spec = spec or SourceSpec(
        name=str(BUNDLED / "openai.jsonl"),
        label="oa",
        format="messages",
        meta={"correctness": {"column": "correct", "map": {True: 1.0, False: 0.0}}},
    )
    mix = open_mix(DatasetConfig(sources=[spec]))
    return CurateStage(cfg, mix), mix


def _row(i: int, record: dict | None, copy: int = 0, error: str | None = None) -> MixedRow:
    return MixedRow(i, 0, SourceRow(i, record, f"x.jsonl:{i + 1}", error), copy)


def _chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "correct": True}


def test_a_batch_becomes_kept_rows_pools_and_rejects_with_reasons(tmp_path: Path) -> None:
    stage, _ = _stage(tmp_path, pools={"right": "meta_correctness >= 1"}, filters=[{"name": "chat_structure"}])
    rows = [
        _row(0, _chat("q", "a")),
        _row(1, {"messages": [{"role": "user", "content": "q only"}]}),
        _row(2, None, error="line is not valid JSON"),
        _row(3, {"messages": 5}),
        _row(4, _chat("q", "a")),  # the same content as row 0
        _row(5, _chat("q", "a"), copy=1),  # an up-sampled repeat of row 0: kept, with its own id
    ]
    result = stage.process(rows)
    data = result.outputs["data"]
    assert data.num_rows == 2 and data.column("id").to_pylist()[1].endswith(".1")
    assert result.outputs["pools/right"].num_rows == 2
    steps = [(r["filter"], r["where"]) for r in result.rejected]
    assert steps == [
        ("chat_structure", "x.jsonl:2"),
        ("input", "x.jsonl:3"),
        ("normalize", "x.jsonl:4"),
        ("dedup_exact", "x.jsonl:5"),
    ]
    assert result.counts["by_source"]["oa"] == {
        "rows_in": 6,
        "rows_kept": 2,
        "chars_kept": 8,  # "q\n\na" twice
        "removed": {"chat_structure": 1, "input": 1, "normalize": 1, "dedup_exact": 1},
    }


def test_dedup_state_is_restored_from_kept_ids(tmp_path: Path) -> None:
    import pyarrow as pa

    stage, _ = _stage(tmp_path, filters=[])
    first = stage.process([_row(0, _chat("q", "a"))]).outputs["data"]
    fresh, _ = _stage(tmp_path, filters=[])
    fresh.restore(pa.table({"id": first.column("id")}))
    assert fresh.process([_row(1, _chat("q", "a"))]).rejected[0]["filter"] == "dedup_exact"


def test_filters_apply_to_their_kind_of_row(tmp_path: Path) -> None:
    spec = SourceSpec(name=str(BUNDLED / "documents.jsonl"), label="docs", format="auto")
    stage, _ = _stage(tmp_path, filters=[{"name": "chat_structure"}, {"name": "gopher_quality"}], spec=spec)
    result = stage.process([_row(0, {"text": "too short"}), _row(1, _chat("q", "a"))])
    assert [r["filter"] for r in result.rejected] == ["gopher_quality"]
    assert result.outputs["data"].num_rows == 1


def test_the_bundled_tiny_mix_is_what_its_generator_writes(tmp_path: Path) -> None:
    for path in write_tiny_mix(tmp_path):
        assert path.read_bytes() == (BUNDLED / path.name).read_bytes(), "re-run python -m forge.stages.curate.tiny_mix"


def test_mix_sources_keep_their_labels(tmp_path: Path) -> None:
    stage, mix = _stage(tmp_path)
    assert isinstance(mix, Mix) and isinstance(mix.sources[0], MixSource) and mix.sources[0].label == "oa"


def test_a_lone_surrogate_is_a_rejected_row_not_a_dead_batch(tmp_path: Path) -> None:
    """json lets `"\\ud800"` through; no Parquet file can hold it: that row alone is rejected."""
    stage, _ = _stage(tmp_path, filters=[])
    result = stage.process([_row(0, _chat("q \ud800", "a")), _row(1, _chat("fine", "ok"))])
    assert result.outputs["data"].num_rows == 1
    [bad] = result.rejected
    assert bad["filter"] == "normalize" and "surrogate" in bad["reason"] and "\\ud800" in bad["row"]
    assert result.counts["by_source"]["oa"]["rows_kept"] == 1
