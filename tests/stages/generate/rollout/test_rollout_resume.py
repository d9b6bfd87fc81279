"""The resume contract per step: a three-step user rollout (with a bug on some rows) is SIGKILLed
at random moments and re-run; no row is lost or duplicated, and over all attempts the server
gets at most steps x rows requests plus those in flight at each kill."""

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
from conftest import endpoint_args, read_rows
from test_rollout_run import bad_rows, posts, user_project

pytestmark = pytest.mark.slow
IN_FLIGHT = 8


def test_kill_mid_rollout_at_random_moments_then_resume(tmp_path: Path, cpu_server: dict) -> None:
    n = 60
    project, data = user_project(tmp_path, n)
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "forge.cli",
        "run.progress=false",
        *endpoint_args(cpu_server),
        "rollout.fn=my_pkg.rollouts:three_steps",
        f"dataset.name={data}",
        "dataset.id_column=id",
        "generation.max_tokens=12",
        f"run.max_in_flight={IN_FLIGHT}",
        "output.examples_per_chunk=7",
        f"output.dir={out}",
    ]
    seed = int(os.environ.get("FORGE_KILL_SEED", time.time()))
    rng = random.Random(seed)
    start = posts(cpu_server)
    kills = 0
    for _ in range(4):
        before = posts(cpu_server)
        amount = rng.randint(3, 40)
        proc = subprocess.Popen(
            args, cwd=project, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and posts(cpu_server) - before < amount:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.2))
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    final = subprocess.run(args, cwd=project, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    bad, steps_x_rows = bad_rows(n)
    rows = Counter((r["id"], r["rollout"], r["output_index"]) for r in read_rows(out))
    assert {k[0] for k in rows} == {f"doc{i}" for i in range(n)} - bad, "rows lost"
    assert max(rows.values()) == 1, "rows duplicated"
    rejected = Counter(r["id"] for r in read_rows(out, "rejected"))
    assert set(rejected) == bad and max(rejected.values()) == 1
    sent = posts(cpu_server) - start
    assert steps_x_rows <= sent <= steps_x_rows + kills * IN_FLIGHT, f"seed {seed}: {sent} requests, {kills} kills"
    assert kills >= 2, f"the run finished too fast to be killed (seed {seed})"
    print(f"seed={seed} kills={kills} requests={sent} (steps x rows = {steps_x_rows})")
