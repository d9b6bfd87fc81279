"""forge/stages/tokenize/stage.py and shards.py through the runner's run object (in this process, no
CLI): a curated mix tokenized keeps one token stream per `source.dataset`, so MixtureSampler can
weight them; what the chat template drops is quarantined (default) or kept and counted."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, read_rows, run_batch_stage

from forge.config import ForgeConfig, SourceSpec, validate
from forge.data import MixtureDataset, MixtureSampler, TokenShards
from forge.stages.tokenize.shards import stream_dirs

MIX_TINY = {"openai", "sharegpt", "pairs", "harmony", "documents"}


def _tokenize(tiny_model: Path, data: Path, out: Path, **knobs: object) -> dict:
    cfg = ForgeConfig()
    cfg.pipeline.stage = "tokenize"
    cfg.dataset.name = str(data)
    cfg.output.dir = str(out)
    cfg.run.progress = False
    cfg.tokenize.tokenizer = str(tiny_model)
    cfg.tokenize.workers = 1
    for key, value in knobs.items():
        setattr(cfg.tokenize, key, value)
    validate(cfg)
    return run_batch_stage(cfg)


@pytest.fixture(scope="module")
def curated_mix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`forge pipeline=curate dataset=mix_tiny`: its rows carry `source.dataset`, one per mix source."""
    mix = yaml.safe_load((REPO / "conf" / "dataset" / "mix_tiny.yaml").read_text())
    cfg = ForgeConfig()
    cfg.pipeline.stage = "curate"
    cfg.dataset.name, cfg.dataset.target_rows, cfg.dataset.seed = mix["name"], mix["target_rows"], mix["seed"]
    cfg.dataset.sources = [SourceSpec(**s) for s in mix["sources"]]
    cfg.output.dir = str(tmp_path_factory.mktemp("curated") / "cur")
    cfg.run.progress = False
    validate(cfg)
    run_batch_stage(cfg)
    return Path(cfg.output.dir)


def test_a_curated_mix_keeps_one_stream_per_source_and_counts_what_the_template_drops(
    tiny_model: Path, curated_mix: Path, tmp_path: Path
) -> None:
    """The tiny model's ChatML template renders neither tool calls nor reasoning (mix_tiny has
    both): on_dropped=keep keeps those rows, counted in stats.json and the card; the default
    quarantines them with the reason. Either way one token stream per mix source."""
    assert {r["source"]["dataset"] for r in read_rows(curated_mix)} == MIX_TINY
    keep = tmp_path / "keep"
    stats = _tokenize(tiny_model, curated_mix, keep, on_dropped="keep")
    index = json.loads((keep / "index.json").read_text())
    assert set(index["sources"]) == MIX_TINY
    assert {s["prefix"].split("/")[1] for s in stats["tokenize"]["shards"]} == MIX_TINY
    dropped = stats["tokenize"]["kept_with_dropped_content"]
    assert dropped["tool calls"] > 0 and dropped["reasoning"] > 0
    assert "Kept with content the template drops" in (keep / "README.md").read_text()
    weights = {"openai": 0.5, "documents": 0.5}  # the streams are what a trainer weights
    ds = MixtureDataset({s: TokenShards(keep, 64, s) for s in weights}, seed=0)
    assert len(ds[next(iter(MixtureSampler(weights, num_samples=1)))]["input_ids"]) == 64

    strict = tmp_path / "strict"
    stats = _tokenize(tiny_model, curated_mix, strict)
    quarantined = [r for r in read_rows(strict, "rejected") if r["filter"] == "dropped_content"]
    assert len(quarantined) == stats["removed_by_filter"]["dropped_content"] > 0
    tool = [r["reason"] for r in quarantined if "tool calls" in r["reason"]]
    assert len(tool) == dropped["tool calls"]
    assert all(r.startswith("turn ") and "the chat template does not render its tool calls" in r for r in tool)
    assert "tokenize.on_dropped=keep" in tool[0]
    assert "kept_with_dropped_content" not in stats["tokenize"]
    assert set(json.loads((strict / "index.json").read_text())["sources"]) == MIX_TINY - {"harmony"}  # all reason


def test_a_curated_input_from_one_dataset_keeps_a_single_stream(
    tiny_model: Path, curated_mix: Path, tmp_path: Path
) -> None:
    curated = pq.read_table(curated_mix / "data")
    docs = [r for r in curated.to_pylist() if r["source"]["dataset"] == "documents"]
    one = tmp_path / "one.parquet"
    pq.write_table(pa.Table.from_pylist(docs, schema=curated.schema), one)
    _tokenize(tiny_model, one, tmp_path / "tok")
    assert list(json.loads((tmp_path / "tok" / "index.json").read_text())["sources"]) == ["documents"]


def test_stream_directories_are_filesystem_safe_and_distinct() -> None:
    dirs = stream_dirs(["org/data", "org_data", "Org_Data", "..", "a b"])
    assert dirs["a b"] == "a_b" and dirs[".."] == "source" and dirs["org/data"].startswith("org_data")
    assert len({d.lower() for d in dirs.values()}) == 5  # distinct on a case-insensitive filesystem too
    assert all("/" not in d and d not in (".", "..") for d in dirs.values())
