"""forge/stages/dedup/steps.py and stage.py through the runner's run object (no subprocess): exact-only
dedup, shards without removals, chains of copies, unusable rows, empty input, changed settings."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import read_rows, run_batch_stage, write_jsonl

from forge.config import ForgeConfig, SourceSpec, validate
from forge.run.output import RunChanged
from forge.stages.dedup.planted import Planter, jaccard
from forge.stages.registry import stage_run


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


def test_verified_pairs_counts_each_pair_once_however_many_bands_it_shares(tmp_path: Path) -> None:
    """Planted pairs: 20 documents with a near copy (Jaccard ~0.95, so a pair shares most of the
    bands) and 5 with an exact copy once normalized (found by the exact hash and by every band):
    stats count 25 verified pairs, the distinct pairs in the buckets' files, not pairs x bands."""
    p = Planter(7)
    rows = []
    for i in range(20):
        text = p.document()
        rows += [{"id": f"o{i}", "text": text}, {"id": f"c{i}", "text": p.near_copy(text, 0.95)}]
    for i in range(5):
        text = p.document()
        rows += [{"id": f"x{i}", "text": text}, {"id": f"v{i}", "text": p.variant(text)}]
    rows += [{"id": f"u{i}", "text": p.document()} for i in range(10)]
    cfg = _config(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows))
    stats = run_batch_stage(cfg)
    assert _kept(cfg) == {f"o{i}" for i in range(20)} | {f"x{i}" for i in range(5)} | {f"u{i}" for i in range(10)}
    edges = [np.load(f) for f in sorted((tmp_path / "out" / "state" / "dedup" / "buckets").glob("band_*.npy"))]
    distinct = {tuple(sorted(e)) for e in np.concatenate(edges).tolist()}
    d = stats["dedup"]
    assert d["verified_pairs"] == len(distinct) == 25, d
    assert d["verified_edges_over_bands"] > 25 * 5  # the per-band count this key once reported


@pytest.mark.parametrize("full", ["sig.npy", "band_0003.npy"])
def test_a_full_disk_in_a_dedup_step_names_the_file_and_enospc(tmp_path: Path, monkeypatch, full: str) -> None:
    """A full disk on demand: `open_on_a_full_disk`, a named fake of the `open` the steps write
    their .npy files with, creates the temp file and hands back /dev/full, where every write
    fails with the kernel's ENOSPC (as on a full disk, the OSError names no file). The error names
    the step's file and ENOSPC, the runner's line says to free space, no temp file is left, and
    the re-run (disk freed) finishes."""
    import forge.stages.dedup.steps as steps
    from forge.run.runner import _one_line

    p = Planter(3)
    rows = [{"id": f"r{i}", "text": p.document()} for i in range(10)]
    cfg = _config(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows))

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        if full in Path(path).name:
            Path(path).touch()  # the temp file exists, as it would on a real disk
            return open("/dev/full", mode, *args, **kwargs)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(steps, "open", open_on_a_full_disk, raising=False)
    with pytest.raises(OSError) as caught:
        run_batch_stage(cfg)
    exc = caught.value
    assert exc.errno == errno.ENOSPC and exc.filename.endswith(full) and str(tmp_path / "out") in exc.filename
    assert _one_line(exc) == (
        f"{exc.filename}: No space left on device; free some space and re-run the same command to resume"
    )
    assert not list((tmp_path / "out").rglob(".*.tmp-*")), "a failed write left its temp file behind"
    monkeypatch.undo()
    assert run_batch_stage(cfg)["rows_kept"] == 10
