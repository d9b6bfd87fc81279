"""GPU tier: forge on a real vLLM (dummy weights, real compute), killed mid-run and resumed.

Runs only where a GPU, vllm and a model dir are present: `FORGE_GPU_MODEL=/path/to/model
pytest -m gpu tests/engine/test_gpu.py` (the device README in benchmarks/RESULTS.md)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, read_rows, read_stats, write_jsonl

pytestmark = pytest.mark.gpu
MODEL = os.environ.get("FORGE_GPU_MODEL", "")


def _gpu_ready() -> bool:
    try:
        import torch
        import vllm  # noqa: F401

        return torch.cuda.is_available() and Path(MODEL, "config.json").exists()
    except ImportError:
        return False


def _gpu_processes() -> list[str]:
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"], capture_output=True, text=True
    )
    return [line for line in out.stdout.split() if line.strip()]


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path} (forge exit code {proc.poll()})")


def _gpu_command(tmp_path: Path, n: int, *overrides: str) -> tuple[list[str], Path]:
    """The forge command of a GPU kill test over n prompts (ignore_eos: every answer runs to max_tokens)."""
    rows = [{"id": f"g{i}", "prompt": f"write a story number {i}"} for i in range(n)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "forge.cli",
        "model=qwen3_1.7b_dummy",
        f"model.name_or_path={MODEL}",
        f"dataset.name={data}",
        "dataset.id_column=id",
        "+generation.extra_body.ignore_eos=true",
        "generation.temperature=0.8",
        f"output.dir={out}",
        "output.examples_per_chunk=50",
        "run.progress=false",
        *overrides,
    ]
    return args, out


def _kill_after_ready(args: list[str], out: Path, delay: float) -> None:
    """Start forge in its own process group and SIGKILL the group `delay` s after engine-ready."""
    proc = subprocess.Popen(
        args, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for(out / "forge.log", "engine ready", proc, 600)
        time.sleep(delay)
        assert proc.poll() is None, f"forge finished {delay:.1f} s after engine-ready, before the kill"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.skipif(not _gpu_ready(), reason="needs a GPU, vllm and FORGE_GPU_MODEL")
@pytest.mark.parametrize("engine", ["vllm_async", "vllm"])
def test_kill_and_resume_on_gpu(tmp_path: Path, engine: str) -> None:
    """More rows than fit in flight (3,000 with a 512-sequence engine, 512 tokens each), SIGKILL
    at a random moment after engine-ready: the kill must land mid-run (asserted), and the
    re-run must finish every row exactly once, re-sending nothing that was answered."""
    n = int(os.environ.get("FORGE_GPU_ROWS", "3000"))
    seed = int(os.environ.get("FORGE_GPU_KILL_SEED", str(random.randrange(1 << 30))))
    delay = random.Random(seed).uniform(8.0, 30.0)
    args, out = _gpu_command(tmp_path, n, f"model.engine={engine}", "generation.max_tokens=512")
    _kill_after_ready(args, out, delay)
    time.sleep(5)
    left = _gpu_processes()
    tree = subprocess.run(["ps", "-eo", "pid,ppid,pgid,etimes,args", "--forest"], capture_output=True, text=True)
    assert not left, f"engine processes {left} outlived a SIGKILLed forge:\n{tree.stdout[-4000:]}"
    partial = len(read_rows(out))
    assert partial < n, f"the kill {delay:.1f} s after engine-ready left no row unfinished (seed {seed})"
    final = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]
    pairs = Counter(r["id"] for r in read_rows(out))
    assert len(pairs) == n and max(pairs.values()) == 1
    session = read_stats(out)["sessions"][-1]
    # every row not in a shard was either replayed from the cache or sent once more
    assert session["requests_sent"] + session["cache_hits"] == n - partial
    assert session["requests_sent"] > 0 and session["output_tokens_per_s_per_gpu"] > 0
    assert session["gpus"] == 1
    print(
        f"{engine}: killed {delay:.1f} s after engine-ready (seed {seed}): {partial}/{n} rows in shards; "
        f"resume sent {session['requests_sent']}, replayed {session['cache_hits']} from the cache"
    )


@pytest.mark.skipif(not _gpu_ready(), reason="needs a GPU, vllm and FORGE_GPU_MODEL")
def test_kill_a_prefix_cached_rollout_and_resume_on_gpu(tmp_path: Path) -> None:
    """rollout=self_refine on vllm_async (each step's prompt continues the last one's prompt and
    answer as token ids, so vLLM's prefix cache serves it), SIGKILLed mid-run: the re-run finishes
    every row once, replays every answer the cache holds and sends only the steps never answered."""
    import sqlite3

    n = int(os.environ.get("FORGE_GPU_ROWS", "1500"))
    seed = int(os.environ.get("FORGE_GPU_KILL_SEED", str(random.randrange(1 << 30))))
    delay = random.Random(seed).uniform(8.0, 25.0)
    args, out = _gpu_command(tmp_path, n, "model.engine=vllm_async", "rollout=self_refine", "generation.max_tokens=256")
    _kill_after_ready(args, out, delay)
    partial = len(read_rows(out))
    assert partial < n, f"the kill {delay:.1f} s after engine-ready left no row unfinished (seed {seed})"
    with sqlite3.connect(out / "cache" / "task_00000.sqlite") as db:
        answered = db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    final = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]
    rows = read_rows(out)
    pairs = Counter(r["id"] for r in rows)
    assert len(pairs) == n and max(pairs.values()) == 1
    assert all(len(r["conversation"]) == 6 and r["conversation"][-1]["content"] == r["text"] for r in rows)
    session = read_stats(out)["sessions"][-1]
    # the unfinished samples' steps: each replayed from the cache or sent, never both
    assert session["requests_sent"] + session["cache_hits"] == 3 * (n - partial)
    assert session["cache_hits"] == answered - 3 * partial  # every answer the kill left in the cache
    assert session["prefix_cache_hit_rate"] > 0.2, session
    print(
        f"self_refine: killed {delay:.1f} s after engine-ready (seed {seed}): {partial}/{n} rows in shards, "
        f"{answered} answers in the cache; resume sent {session['requests_sent']}, replayed "
        f"{session['cache_hits']}; prefix-cache hit rate {session['prefix_cache_hit_rate']:.3f}"
    )
