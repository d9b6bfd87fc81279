"""GPU tier of the score stage: vLLM (AsyncLLM in process) against transformers on the same tiny
model, both in float32: prompt log-probabilities per token (1e-3), the whole stage through the
CLI, embeddings from a pooling runner, and two data-parallel engines against one.

Runs where a GPU and vllm are present: `pytest -m gpu tests/score` (benchmarks/RESULTS.md has the
device calls)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from conftest import forge_cli, read_rows, read_stats, write_jsonl
from test_score_run import _chats

pytestmark = pytest.mark.gpu


def _gpus() -> int:
    """GPUs nvidia-smi lists, where vllm imports. Not torch.cuda: CUDA initialized in this process
    breaks the engine process vLLM forks."""
    import importlib.util
    import shutil
    import subprocess

    if importlib.util.find_spec("vllm") is None or not shutil.which("nvidia-smi"):
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


needs_gpu = pytest.mark.skipif(_gpus() < 1, reason="needs a GPU and vllm")
MODELS = {"transformers": "model=tiny_cpu", "vllm": "model=tiny_gpu"}  # the same weights, float32 both


def _sequences(tiny_model: Path) -> list[np.ndarray]:
    """Multi-turn chats as the stage encodes them, plus documents longer than one engine step."""
    from forge.stages.tokenize.config import TokenizeConfig
    from forge.stages.tokenize.encode import Encoder

    enc = Encoder(str(tiny_model), TokenizeConfig(eos=False))
    seqs = [e.tokens for e in enc.chats([r["messages"] for r in _chats(24)])]
    rng = random.Random(3)
    words = "the water of the river runs to the sea and light comes from a star".split()
    docs = [" ".join(rng.choice(words) for _ in range(n)) for n in (700, 1300)]
    return seqs + [e.tokens for e in enc.documents(docs)]


@needs_gpu
def test_vllm_prompt_logprobs_agree_with_transformers_per_token(tiny_model: Path, monkeypatch) -> None:
    from forge.config import ForgeConfig
    from forge.engine.config import EngineKind
    from forge.stages.score.backends import TransformersScorer, VllmScorer

    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # torch in this process has touched CUDA
    seqs = _sequences(tiny_model)
    assert max(len(s) for s in seqs) > 512  # longer than one engine step below: chunked prefill
    reference = TransformersScorer(str(tiny_model), "nll", 4096).token_logprobs(seqs)
    cfg = ForgeConfig()
    cfg.model.name_or_path = str(tiny_model)
    cfg.model.engine = EngineKind.vllm
    cfg.model.max_model_len = 2048
    cfg.model.gpu_memory_utilization = 0.3
    cfg.model.engine_args = {"dtype": "float32", "enforce_eager": True}
    scorer = VllmScorer(cfg, str(tiny_model), "nll", batch_tokens=512)
    try:
        got = scorer.token_logprobs(seqs)
    finally:
        scorer.close()
    worst = 0.0
    for s, a, b in zip(seqs, reference, got, strict=True):
        assert len(a) == len(b) == len(s) - 1
        worst = max(worst, float(np.abs(a - b).max()))
    print(f"largest per-token difference, vLLM vs transformers: {worst:.2e}")
    assert worst < 1e-3


@needs_gpu
def test_score_stage_on_vllm_matches_transformers_row_by_row(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chats.jsonl", _chats(60))
    runs = {}
    for engine in ("transformers", "vllm"):
        out = tmp_path / engine
        args = ["pipeline=score", MODELS[engine], f"dataset.name={data}", f"output.dir={out}"]
        args += ["output.examples_per_chunk=16", "+score.pools.low=nll_mean <= quantile(0.25)"]
        proc = forge_cli(args, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[engine] = {r["source"]["id"]: r for r in read_rows(out)}
        assert read_stats(out)["score"]["scored_tokens_per_s"] > 0
    assert runs["vllm"].keys() == runs["transformers"].keys() and len(runs["vllm"]) == 60
    for key, r in runs["vllm"].items():
        t = runs["transformers"][key]
        assert r["n_scored_tokens"] == t["n_scored_tokens"] and r["turn_tokens"] == t["turn_tokens"]
        assert abs(r["nll_sum"] - t["nll_sum"]) < 1e-3 * r["n_scored_tokens"]
    low = {r["id"] for r in read_rows(tmp_path / "vllm" / "pools", "low")}
    assert 10 <= len(low) <= 20


@needs_gpu
def test_embeddings_from_a_vllm_pooling_runner_match_transformers(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chats.jsonl", _chats(30))
    vectors = {}
    for engine in ("transformers", "vllm"):
        out = tmp_path / engine
        args = ["pipeline=score", MODELS[engine], "score.kind=embed", f"dataset.name={data}", f"output.dir={out}"]
        proc = forge_cli([*args, "score.view=assistant"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        vectors[engine] = {r["source"]["id"]: np.asarray(r["embedding"]) for r in read_rows(out)}
    for key, v in vectors["vllm"].items():
        t = vectors["transformers"][key]
        assert v.shape == t.shape and float(v @ t / (np.linalg.norm(v) * np.linalg.norm(t))) > 0.999


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs and vllm")
def test_two_data_parallel_engines_score_like_one(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chats.jsonl", _chats(200))
    runs = {}
    for dp in (1, 2):
        out = tmp_path / f"dp{dp}"
        args = ["pipeline=score", "model=tiny_gpu", f"model.dp={dp}", f"dataset.name={data}", f"output.dir={out}"]
        proc = forge_cli([*args, "output.examples_per_chunk=50"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[dp] = {r["source"]["id"]: r["nll_sum"] for r in read_rows(out)}
    assert runs[1].keys() == runs[2].keys() and len(runs[2]) == 200
    assert all(abs(runs[1][k] - runs[2][k]) < 1e-3 * max(1.0, abs(runs[1][k])) for k in runs[1])
