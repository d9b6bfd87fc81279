"""`forge pipeline=dedup` end to end through the real CLI, on documents with near-copies planted
at known Jaccard similarities (forge/stages/dedup/planted.py): recall, false removals, the same result
with 1 and 7 tasks, chats compared on the prompt only, keep policies, kill -9 in every step,
changed settings, stats, card and PNG."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import forge_cli, kill_forge_at_random, read_rows, read_stats, write_jsonl

from forge.stages.dedup.planted import evaluate, removed_in_run, write

pytestmark = pytest.mark.slow
THRESHOLD = 0.7


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("planted")
    write(d, 2000, seed=3)
    return d


def _args(data: Path, out: Path, *extra: str, source: str = "") -> list[str]:
    sources = (
        f"dataset.sources=[{{name:{data / 'a.jsonl'},label:a{source}}},{{name:{data / 'b.jsonl'},label:b{source}}}]"
    )
    return ["pipeline=dedup", sources, f"output.dir={out}", f"dedup.minhash.threshold={THRESHOLD}", *extra]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = forge_cli(args, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _result(out: Path) -> tuple[list[str], dict]:
    kept = sorted(r["source"]["id"] for r in read_rows(out))
    return kept, removed_in_run(out)


def test_planted_copies_are_found_across_sources_and_7_tasks_give_the_same_result(
    planted: Path, tmp_path: Path
) -> None:
    truth = json.loads((planted / "truth.json").read_text())
    one, seven = tmp_path / "one", tmp_path / "seven"
    proc = _run(_args(planted, one), tmp_path)
    assert "bands x" in proc.stderr  # the derived LSH layout is printed
    _run(_args(planted, seven, "cluster.tasks=7", "dedup.signature_rows=97", "dedup.band_tasks=3"), tmp_path)
    kept, removed = _result(one)
    assert (kept, removed) == _result(seven)
    score = evaluate(removed, truth, 2000, THRESHOLD)
    assert score["recall"] >= 0.95, score
    assert score["unrelated_removed"] < 0.01, score
    assert score["below_threshold_removed"] < 0.2, score
    assert len(kept) + len(removed) == 2000
    # copies across sources: some removed rows of b duplicate rows of a
    a_ids = {json.loads(line)["id"] for line in (planted / "a.jsonl").read_text().splitlines()}
    assert any(rid not in a_ids and of in a_ids for rid, of in removed.items())
    rejected = read_rows(one, "rejected")
    exact = [r for r in rejected if r["filter"] == "dedup_exact"]
    near = [r for r in rejected if r["filter"] == "dedup_near"]
    assert exact and near and len(exact) + len(near) == len(rejected)
    assert all(r["jaccard"] == 1.0 for r in exact)
    assert all(THRESHOLD <= r["jaccard"] < 1.0 for r in near)
    assert all(r["duplicate_of"] and r["duplicate_of"] in r["reason"] for r in rejected)
    # keep=first: the kept row came first in the input stream (source a, then source b)
    lines = [*(planted / "a.jsonl").read_text().splitlines(), *(planted / "b.jsonl").read_text().splitlines()]
    position = {json.loads(line)["id"]: n for n, line in enumerate(lines)}
    assert all(position[of] < position[rid] for rid, of in removed.items())
    stats = read_stats(one)
    d = stats["dedup"]
    assert d["rows_in"] == 2000 and d["exact_duplicates"] == len(exact) and d["near_duplicates"] == len(near)
    assert (
        d["clusters"] > 0 and sum(int(s) * n for s, n in d["cluster_size_histogram"].items()) == d["rows_in_clusters"]
    )
    assert stats["by_source"]["a"]["rows_kept"] + stats["by_source"]["b"]["rows_kept"] == len(kept)
    assert (one / "cluster_sizes.png").read_bytes()[:4] == b"\x89PNG"
    card = (one / "README.md").read_text()
    assert "## Deduplication" in card and "cluster_sizes.png" in card


def test_chats_compared_on_the_prompt_only(tmp_path: Path) -> None:
    data = tmp_path / "chats"
    write(data, 600, seed=5, chats=True)
    truth = json.loads((data / "truth.json").read_text())
    prompts, whole = tmp_path / "prompts", tmp_path / "whole"
    _run(_args(data, prompts, "dedup.field=messages.user"), tmp_path)
    _run(_args(data, whole, "dedup.field=messages"), tmp_path)
    on_prompt = evaluate(removed_in_run(prompts), truth, 600, THRESHOLD)
    on_whole = evaluate(removed_in_run(whole), truth, 600, THRESHOLD)
    assert on_prompt["recall"] >= 0.95 and on_prompt["unrelated_removed"] < 0.01, on_prompt
    # each copy has its own answer: whole conversations are no longer exact copies
    assert not [r for r in read_rows(whole, "rejected") if r["filter"] == "dedup_exact"]
    assert on_whole["recall"] < on_prompt["recall"]


def _cluster_rows() -> list[dict]:
    base = "the quick brown fox jumps over the lazy dog near the river bank at dawn every single day"
    return [
        {"id": "short", "text": base, "quality": "0.2"},
        {"id": "long", "text": base + " and again at dusk", "quality": "0.5"},
        {"id": "best", "text": base.upper(), "quality": "0.9"},
        {"id": "other", "text": "an unrelated sentence about cooking pasta with garlic and olive oil", "quality": "1"},
    ]


@pytest.mark.parametrize(
    ("extra", "winner"),
    [
        ([], "short"),
        (["dedup.keep=longest"], "long"),
        (["dedup.keep=meta_correctness", "+dataset.meta={correctness:{column:quality}}"], "best"),
        (["dedup.keep=source", "dedup.source_priority=[b]"], "long"),
    ],
    ids=["first", "longest", "meta", "source"],
)
def test_keep_policy_picks_the_row_that_stays(tmp_path: Path, extra: list[str], winner: str) -> None:
    rows = _cluster_rows()
    write_jsonl(tmp_path / "a.jsonl", [rows[0], rows[2], rows[3]])
    write_jsonl(tmp_path / "b.jsonl", [rows[1]])
    out = tmp_path / "out"
    meta = ",meta:{correctness:{column:quality}}"  # every source maps its `quality` column to meta_correctness
    _run(_args(tmp_path, out, "dedup.minhash.threshold=0.6", "dedup.minhash.n_grams=3", *extra, source=meta), tmp_path)
    kept, removed = _result(out)
    assert kept == sorted([winner, "other"]), (kept, removed)
    assert set(removed.values()) == {winner}


def _reference(planted: Path, tmp_path: Path, extra: list[str]) -> tuple[list[str], dict]:
    ref = tmp_path / "ref"
    _run(_args(planted, ref, *extra), tmp_path)
    return _result(ref)


@pytest.mark.parametrize("step", ["signatures", "buckets", "clusters", "filter"])
def test_kill_9_in_each_step_then_rerun_gives_the_uninterrupted_result(
    planted: Path, tmp_path: Path, step: str
) -> None:
    extra = ["cluster.tasks=3", "dedup.signature_rows=50", "output.examples_per_chunk=40", "run.progress=false"]
    want = _reference(planted, tmp_path, extra)
    out = tmp_path / "killed"
    args = _args(planted, out, *extra)
    watch = out / ("data" if step == "filter" else f"state/dedup/{step}")
    # two kills in the step (the second lands on a resumed session)
    kill_forge_at_random(args, tmp_path, lambda: watch.exists() and any(watch.iterdir()), 0.05)
    _run(args, tmp_path)
    kept, removed = _result(out)
    assert (kept, removed) == want
    assert len(read_rows(out)) == len(kept)  # nothing written twice
    assert read_stats(out)["rows_in"] == 2000


def test_changed_settings_are_refused_and_fresh_starts_over(planted: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run(_args(planted, out), tmp_path)
    kept = len(read_rows(out))
    changed = forge_cli(_args(planted, out, "dedup.minhash.num_hashes=64"), tmp_path)
    assert changed.returncode == 2 and "dedup.minhash.num_hashes" in changed.stderr, changed.stderr[-2000:]
    assert len(read_rows(out)) == kept  # nothing already done is lost
    _run(_args(planted, out, "dedup.minhash.num_hashes=64", "output.on_change=fresh"), tmp_path)


def test_bad_settings_name_the_key(planted: Path, tmp_path: Path) -> None:
    for extra, key in [
        (["dedup.keep=biggest"], "dedup.keep"),
        (["dedup.keep=meta_nope"], "dedup.keep"),
        (["dedup.keep=source", "dedup.source_priority=[c]"], "dedup.source_priority"),
        (["dedup.minhash.bands=40", "dedup.minhash.rows=5"], "dedup.minhash.bands"),
        (["dedup.field=nope"], "dedup.field"),
    ]:
        out = tmp_path / key.replace(".", "_")
        proc = forge_cli(_args(planted, out, *extra), tmp_path)
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        assert key in proc.stderr, (extra, proc.stderr[-2000:])
