"""kill -9 inside each step of a recipe, then the same command again: finished steps are skipped
(no second session in their logs), the interrupted step resumes, every row is written exactly
once, with the fingerprints and document counts of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import read_rows, run_recipe

STEPS = ["generate", "curate", "dedup", "score", "tokenize"]
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tiny_recipe")]


def _started(root: Path, step: str) -> bool:
    return any((d / "state" / "started.json").exists() for d in (root / "steps" / step).glob("*") if d.is_dir())


def _sessions(step_dir: Path) -> int:
    log = step_dir / "forge.log"
    return log.read_text().count("=== forge run ") if log.exists() else 0


def test_kill_9_inside_each_step_then_rerun_loses_and_repeats_nothing(tiny_recipe: Path, tmp_path: Path) -> None:
    root = tmp_path / "tiny_sft"
    rng = random.Random(int(time.time()))
    args = [sys.executable, "-m", "forge.cli", "run.progress=false", "recipe=tiny_sft", f"recipe.dir={root}"]
    killed = []
    for step in STEPS:
        proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while not _started(root, step) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.5))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed.append(step)
        proc.wait()
    assert killed, "the recipe finished before any kill"

    done = run_recipe(tmp_path, root)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((root / "state.json").read_text())["current"]
    want = json.loads((tiny_recipe / "state.json").read_text())["current"]
    assert state == want  # the same fingerprints as the uninterrupted run
    for step in STEPS:
        step_dir = root / "steps" / step / state[step]
        assert (step_dir / "state" / "finished.json").exists(), step
        if step != "tokenize":
            ids = Counter((r["id"], r.get("rollout", 0)) for r in read_rows(step_dir))
            assert ids and max(ids.values()) == 1, step
            assert sum(ids.values()) == len(read_rows(tiny_recipe / step)), step
        assert _sessions(step_dir) <= 1 + killed.count(step) + 1, step
    # a finished step is never run again: its log has only the sessions that finished or were killed
    rerun = run_recipe(tmp_path, root)
    assert rerun.returncode == 0 and rerun.stdout.count(": up to date (") == len(STEPS)
    index = json.loads((root / "tokenize" / "index.json").read_text())
    base = json.loads((tiny_recipe / "tokenize" / "index.json").read_text())
    # the same documents from the same sources (sampled text may differ: a CPU engine's batches differ)
    assert {k: v["documents"] for k, v in index["sources"].items()} == {
        k: v["documents"] for k, v in base["sources"].items()
    }
