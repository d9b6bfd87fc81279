"""forge/dedup/steps.py and stage.py through the runner's run object (no subprocess): exact-only
dedup, shards without removals, chains of copies, unusable rows, empty input, changed settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import read_rows, run_batch_stage, write_jsonl

from forge.config import ForgeConfig, SourceSpec, validate
from forge.dedup.planted import Planter, jaccard
from forge.output import RunChanged
from forge.stages import stage_run


def _config(tmp_path: Path, *files: Path, **dedup: object) -> ForgeConfig:
    cfg = ForgeConfig()
    cfg.pipeline.stage = "dedup"
    cfg.dataset.sources = [SourceSpec(name=str(f), label=f.stem) for f in files]
    cfg.output.dir = str(tmp_path / "out")
    cfg.run.progress = False
    for key, value in dedup.items():
        if key == "tasks":
            cfg.cluster.tasks = value
        elif key.startswith("minhash_"):
            setattr(cfg.dedup.minhash, key[len("minhash_") :], value)
        else:
            setattr(cfg.dedup, key, value)
    validate(cfg)
    return cfg


def _kept(cfg: ForgeConfig) -> set[str]:
    return {r["source"]["id"] for r in read_rows(Path(cfg.output.dir))}


def test_exact_only_writes_no_signatures_and_finds_normalized_copies(tmp_path: Path) -> None:
    p = Planter(1)
    text = p.document()
    rows = [
        {"id": "a", "text": text},
        {"id": "b", "text": p.variant(text)},
        {"id": "c", "text": p.near_copy(text, 0.9)},
    ]
    cfg = _config(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), minhash_enabled=False)
    stats = run_batch_stage(cfg)
    assert _kept(cfg) == {"a", "c"}
    assert not list((tmp_path / "out" / "state" / "dedup" / "signatures").glob("*.npy"))
    assert stats["dedup"]["exact_duplicates"] == 1 and stats["dedup"]["near_duplicates"] == 0


def test_shards_without_removals_and_a_chain_of_copies(tmp_path: Path) -> None:
    """A~B and B~C above the threshold, A and C below it: B goes, C stays (it is a copy of no row
    that stays). With 5 tasks most shards have nothing to remove."""
    p = Planter(2)
    words = p.document(200, 200).split()
    a = " ".join(words)
    b = " ".join(words[:20] + p.words(15) + words[35:])  # 19 of 196 shingles differ: J ~0.82
    c = " ".join(b.split()[:150] + p.words(15) + words[165:])  # another span: J(a, c) ~0.68
    assert jaccard(a, c) < 0.7 <= min(jaccard(a, b), jaccard(b, c))
    rows = [{"id": "a", "text": a}, {"id": "b", "text": b}, {"id": "c", "text": c}]
    rows += [{"id": f"u{i}", "text": p.document()} for i in range(20)]
    cfg = _config(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), tasks=5)
    stats = run_batch_stage(cfg)
    assert _kept(cfg) == {r["id"] for r in rows} - {"b"}
    [gone] = read_rows(Path(cfg.output.dir), "rejected")
    assert json.loads(gone["row"])["id"] == "b" and gone["filter"] == "dedup_near" and gone["jaccard"] >= 0.7
    assert stats["dedup"]["cluster_size_histogram"] == {"3": 1}


def test_unusable_rows_are_rejected_and_the_rest_deduplicated(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"id": "a", "text": "same words here"}, {"id": "bad", "text": "lone \ud800 surrogate"}])
    with open(data, "a") as fh:
        fh.write("{not json\n")
        fh.write(json.dumps({"id": "a2", "text": "SAME   words here"}) + "\n")
    cfg = _config(tmp_path, data)
    stats = run_batch_stage(cfg)
    assert _kept(cfg) == {"a"}
    why = {r["filter"] for r in read_rows(Path(cfg.output.dir), "rejected")}
    assert why == {"input", "normalize", "dedup_exact"}
    assert stats["rows_in"] == 4


def test_empty_input(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("")
    cfg = _config(tmp_path, data)
    stats = run_batch_stage(cfg)
    assert stats["rows_in"] == 0 and stats["dedup"]["clusters"] == 0


def test_steps_made_with_other_settings_are_refused(tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "text": f"document number {i} with some words"} for i in range(10)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = _config(tmp_path, data)
    run = stage_run(cfg)
    run.prepare()
    run.workflow.run("signatures", 0)  # killed after the first step: no rows written yet
    other = _config(tmp_path, data, minhash_n_grams=3)
    with pytest.raises(RunChanged, match="dedup steps made with other settings"):
        stage_run(other).prepare()
