"""dedup.method=semantic end to end through the real CLI, on planted near-paraphrase families
(forge/stages/dedup/paraphrases.py: reordered, synonym-swapped, truncated, all three) among
unrelated documents, with the lexical embedder: recall and false removals, the same result with 1
and 3 tasks, keep policies, kill -9 in a step, and the model embedder on the CPU engine."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import forge_cli, kill_forge_at_random, read_rows, read_stats, write_jsonl

from forge.stages.curate.rows import content_id
from forge.stages.dedup.embedders import LexicalEmbedder, idf, weigh
from forge.stages.dedup.paraphrases import plant_paraphrases
from forge.stages.dedup.semantic import kmeans


def test_lexical_embedder_separates_paraphrases_from_unrelated_rows() -> None:
    rows, truth = plant_paraphrases(30, 200, seed=1)
    emb = LexicalEmbedder(1024).embed([r["text"] for r in rows])
    v = weigh(emb, idf((emb != 0).sum(axis=0), len(emb)))
    at = {r["id"]: i for i, r in enumerate(rows)}
    family = [float(v[at[f[0]]] @ v[at[i]]) for f in truth for i in f[1:]]
    others = [at[r["id"]] for r in rows if r["id"].startswith("other")]
    sims = v[others] @ v[others].T
    np.fill_diagonal(sims, 0)
    assert min(family) > 0.6 > 0.3 > sims.max()


def test_kmeans_finds_separated_groups() -> None:
    rng = np.random.default_rng(0)
    centers = np.eye(8, dtype=np.float32)[:4]
    x = np.concatenate([c + 0.05 * rng.standard_normal((50, 8)).astype(np.float32) for c in centers])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    found = kmeans(x, 4, 20, seed=3)
    label = np.argmax(x @ found.T, axis=1)
    assert sorted(np.bincount(label, minlength=4).tolist()) == [50, 50, 50, 50]


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[str]]]:
    rows, truth = plant_paraphrases(60, 600, seed=5)
    path = write_jsonl(tmp_path_factory.mktemp("para") / "docs.jsonl", rows)
    return path, truth


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = forge_cli(args, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["pipeline=dedup", "dedup.method=semantic", f"dataset.name={data}", f"output.dir={out}", *extra]


def _removed(out: Path, data: Path) -> dict[str, str]:
    """input id -> input id of the row kept in its place."""
    by_content = {content_id(None, r["text"]): r["id"] for r in map(json.loads, data.read_text().splitlines())}
    rejected = read_rows(out, "rejected")
    return {by_content[r["id"]]: by_content[r["duplicate_of"]] for r in rejected}


@pytest.mark.slow
def test_planted_paraphrases_are_found_and_tasks_do_not_change_the_result(families, tmp_path: Path) -> None:
    data, truth = families
    one, three = tmp_path / "one", tmp_path / "three"
    small = ["dedup.semantic.cluster_rows=200", "dedup.signature_rows=97", "dedup.semantic.pair_rows=300"]
    proc = _run(_args(data, one, *small), tmp_path)
    assert "hashed TF-IDF" in proc.stderr and "cosine >= 0.6" in proc.stderr
    _run(_args(data, three, *small, "cluster.tasks=3"), tmp_path)
    removed = _removed(one, data)
    assert removed == _removed(three, data)
    family_of = {i: k for k, ids in enumerate(truth) for i in ids}
    planted = sum(len(f) - 1 for f in truth)  # each family keeps one row
    found = sum(1 for i, of in removed.items() if i in family_of and family_of[i] == family_of.get(of))
    false = [i for i in removed if i not in family_of]
    assert found / planted >= 0.95, (found, planted)
    assert not false
    kept, rejected = read_rows(one), read_rows(one, "rejected")
    assert len(kept) + len(rejected) == 60 * 5 + 600
    kept_ids = {r["id"] for r in kept}
    assert all(r["duplicate_of"] in kept_ids and r["similarity"] >= 0.6 for r in rejected)  # no chains
    assert {r["filter"] for r in rejected} == {"dedup_semantic"} and "cosine similarity" in rejected[0]["reason"]
    stats = read_stats(one)["dedup"]
    assert stats["method"] == "semantic" and stats["embedder"] == "lexical" and stats["kmeans_clusters"] >= 4
    assert stats["near_duplicates"] == len(rejected)
    assert "semantic duplicates removed" in (one / "README.md").read_text()


@pytest.mark.slow
def test_keep_longest_keeps_the_full_version(families, tmp_path: Path) -> None:
    data, truth = families
    out = tmp_path / "longest"
    _run(_args(data, out, "dedup.keep=longest", "dedup.semantic.threshold=0.65"), tmp_path)
    removed = _removed(out, data)
    length = {r["id"]: len(r["text"]) for r in map(json.loads, data.read_text().splitlines())}
    for family in truth:
        most = max(length[i] for i in family)
        assert any(length[i] == most and i not in removed for i in family)
        assert all(length[removed[i]] >= length[i] for i in family if i in removed)


@pytest.mark.slow
@pytest.mark.parametrize("step", ["embeddings", "pairs"])
def test_kill_9_in_a_step_then_rerun_gives_the_uninterrupted_result(families, tmp_path: Path, step: str) -> None:
    data, _ = families
    extra = [
        "cluster.tasks=2",
        "dedup.signature_rows=40",
        "dedup.semantic.cluster_rows=100",
        "dedup.semantic.pair_rows=150",
        "run.progress=false",
    ]
    ref = tmp_path / "ref"
    _run(_args(data, ref, *extra), tmp_path)
    out = tmp_path / "killed"
    watch = out / "state" / "dedup" / step
    kill_forge_at_random(_args(data, out, *extra), tmp_path, lambda: watch.exists() and any(watch.iterdir()), 0.3)
    _run(_args(data, out, *extra), tmp_path)
    assert _removed(out, data) == _removed(ref, data)
    assert len(read_rows(out)) + len(read_rows(out, "rejected")) == 900


@pytest.mark.slow
def test_model_embedder_on_the_cpu_engine(tmp_path: Path) -> None:
    """The tiny random-weight model through transformers: random weights find no paraphrase,
    but exact copies (cosine 1) are removed as exact, and the run records the model."""
    rows = [{"id": f"r{i}", "text": f"document number {i} about the river and the sea"} for i in range(20)]
    rows += [dict(rows[3], id="copy3"), dict(rows[7], id="copy7")]
    data = write_jsonl(tmp_path / "docs.jsonl", rows)
    out = tmp_path / "out"
    extra = ["model=tiny_cpu", "dedup.semantic.embedder=model", "dedup.semantic.threshold=0.9999"]
    proc = _run(_args(data, out, *extra), tmp_path)
    assert "embeddings of" in proc.stderr and "hashed TF-IDF" not in proc.stderr
    rejected = read_rows(out, "rejected")
    assert sorted(json.loads(r["row"])["id"] for r in rejected) == ["copy3", "copy7"]
    assert {r["filter"] for r in rejected} == {"dedup_exact"}
    assert read_stats(out)["dedup"]["embedder"] == "model"


@pytest.mark.slow
def test_bad_semantic_settings_name_the_key(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    for extra, key in [
        (["dedup.method=simhash"], "dedup.method"),
        (["dedup.semantic.threshold=1.5"], "dedup.semantic.threshold"),
        (["dedup.semantic.embedder=bert"], "dedup.semantic.embedder"),
        (["dedup.semantic.dim=0"], "dedup.semantic.dim"),
    ]:
        proc = forge_cli(_args(data, tmp_path / "o", *extra), tmp_path)
        assert proc.returncode == 2 and key in proc.stderr, (extra, proc.stderr[-1500:])
