"""GPU tier: forge on a real vLLM (dummy weights, real compute), killed mid-run and resumed.

Runs only where a GPU, vllm and a model dir are present: `FORGE_GPU_MODEL=/path/to/model
pytest -m gpu tests/engine/test_gpu.py` (the device README in benchmarks/RESULTS.md)."""

from __future__ import annotations

import os
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


@pytest.mark.skipif(not _gpu_ready(), reason="needs a GPU, vllm and FORGE_GPU_MODEL")
@pytest.mark.parametrize("engine", ["vllm_async", "vllm"])
def test_kill_and_resume_on_gpu(tmp_path: Path, engine: str) -> None:
    n = 400
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"g{i}", "prompt": f"write a story number {i}"} for i in range(n)])
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "forge.cli",
        "model=qwen3_1.7b_dummy",
        f"model.engine={engine}",
        f"model.name_or_path={MODEL}",
        f"dataset.name={data}",
        "dataset.id_column=id",
        "generation.max_tokens=512",
        "+generation.extra_body.ignore_eos=true",
        "generation.temperature=0.8",
        f"output.dir={out}",
        "output.examples_per_chunk=20",
        "run.progress=false",
    ]
    proc = subprocess.Popen(
        args, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 400
    while not list((out / "data").glob("*.parquet")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, "finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(5)
    assert not _gpu_processes(), "engine processes outlived a SIGKILLed forge"
    partial = len(read_rows(out))
    final = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    pairs = Counter(r["id"] for r in read_rows(out))
    assert len(pairs) == n and max(pairs.values()) == 1
    session = read_stats(out)["sessions"][-1]
    # every row not in a shard was either replayed from the cache or sent once more
    assert session["requests_sent"] + session["cache_hits"] == n - partial
    assert session["gpus"] == 1
    if session["requests_sent"]:  # a whole wave can finish (and be cached) before the kill
        assert session["output_tokens_per_s_per_gpu"] > 0
    print(
        f"{engine}: {partial} rows in shards at the kill; resume sent {session['requests_sent']}, "
        f"replayed {session['cache_hits']} from the cache"
    )
