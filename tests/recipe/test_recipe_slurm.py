"""A recipe on the CI Slurm (marker `slurm`): one command submits the whole graph as dependent
arrays; a second command while it is queued or running submits nothing again and waits; the
result has the local run's fingerprints and rows; forge-status shows every step with its jobs."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from conftest import read_rows, run_recipe

from forge.cluster.state import load_history

STEPS = ["generate", "curate", "dedup", "score", "tokenize"]
pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_env"), pytest.mark.xdist_group("tiny_recipe")]


def test_a_recipe_on_slurm_is_one_submission_and_matches_the_local_result(tiny_recipe: Path, tmp_path: Path) -> None:
    root = tmp_path / "tiny_sft"
    first = run_recipe(tmp_path, root, "cluster=slurm_ci", timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    for step in STEPS[1:]:
        assert f"step {step} ({step}): will run: input" in first.stdout and "after job(s)" in first.stdout
    again = run_recipe(tmp_path, root, "cluster=slurm_ci", "cluster.wait=true", timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "will run" not in again.stdout  # queued, running or done: never a second submission
    state = json.loads((root / "state.json").read_text())["current"]
    local = json.loads((tiny_recipe / "state.json").read_text())["current"]
    assert state == local
    for step in STEPS:
        step_dir = root / "steps" / step / state[step]
        assert len(load_history(step_dir)) == 1, step
        assert (step_dir / "state" / "finished.json").exists(), step
        if step == "generate":  # the same requests (sampled text may differ between engine runs)
            mine = Counter((r["id"], r.get("rollout", 0)) for r in read_rows(step_dir))
            theirs = Counter((r["id"], r.get("rollout", 0)) for r in read_rows(tiny_recipe / step))
            assert mine == theirs and max(mine.values()) == 1
        elif step != "tokenize":  # later ids hash the content: compare how many rows each step kept
            assert len(read_rows(step_dir)) == len(read_rows(tiny_recipe / step)), step
    card = (root / "tokenize" / "README.md").read_text()
    assert "## Lineage" in card and "| generate | generate |" in card and "| 48 |" in card
    status = subprocess.run(["forge-status", str(root)], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "5/5 step(s) finished and up to date" in status.stdout, status.stdout
    rerun = run_recipe(tmp_path, root, "cluster=slurm_ci", timeout=300)
    assert rerun.returncode == 0 and rerun.stdout.count(": up to date (") == len(STEPS), rerun.stdout
