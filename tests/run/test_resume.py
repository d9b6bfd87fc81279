"""The resume contract under real kills: forge (with its own engine) is SIGKILLed as a process
group at random moments, then re-run; no row is lost or duplicated and finished requests are not
re-sent; Ctrl-C saves rows and stops the engine. (An engine killed mid-run, restarted or dead for
good, is in the fault matrix: tests/faults/test_fault_process.py.)"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import read_rows, read_stats, write_jsonl

pytestmark = pytest.mark.slow
IN_FLIGHT = 8


def _args(data: Path, out: Path, n_tokens: int = 24) -> list[str]:
    return [
        sys.executable,
        "-m",
        "forge.cli",
        "run.progress=false",
        f"dataset.name={data}",
        f"generation.max_tokens={n_tokens}",
        f"output.dir={out}",
        "output.examples_per_chunk=10",
        f"run.max_in_flight={IN_FLIGHT}",
        "generation.rollouts=2",
        "generation.seed=3",
    ]


def _engine_pids(out: Path) -> list[int]:
    text = (out / "forge.log").read_text() if (out / "forge.log").exists() else ""
    return [int(p) for p in re.findall(r"engine pid (\d+)", text)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its reaper is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _posts(out: Path) -> int:
    return sum(
        log.read_text(errors="replace").count('"POST /v1/chat/completions') for log in (out / "logs").glob("*.log")
    )


def _start_until_answers(args: list[str], cwd: Path, out: Path, answers: int) -> subprocess.Popen:
    """forge in its own process group, returned once the engine has answered `answers` requests."""
    proc = subprocess.Popen(
        args, cwd=cwd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 180
    while (not (out / "logs").exists() or _posts(out) < answers) and time.time() < deadline:
        time.sleep(0.1)
    return proc


def test_kill_at_random_moments_then_resume(tmp_path: Path, tiny_model: Path) -> None:
    n_docs = 200
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"id": f"doc{i}", "prompt": f"write about topic {i}"} for i in range(n_docs)]
    )
    out = tmp_path / "out"
    args = _args(data, out) + ["dataset.id_column=id"]
    seed = int(os.environ.get("FORGE_KILL_SEED", time.time()))
    rng = random.Random(seed)
    kills = 0
    # first kill at a random moment (often during start-up), then after a random number of answers
    plan = [("seconds", rng.uniform(1, 5))] + [("answers", rng.randint(5, 80)) for _ in range(3)]
    for kind, amount in plan:
        before = _posts(out) if (out / "logs").exists() else 0
        proc = subprocess.Popen(
            args, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + (amount if kind == "seconds" else 240)
        while time.time() < deadline and proc.poll() is None:
            if kind == "answers" and (out / "logs").exists() and _posts(out) - before >= amount:
                time.sleep(rng.uniform(0, 0.3))
                break
            time.sleep(0.05)
        if proc.poll() is not None:
            break  # it finished before this kill
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        deadline = time.time() + 10
        while any(_alive(p) for p in _engine_pids(out)) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in _engine_pids(out)), "the engine outlived a SIGKILLed forge"
    final = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    rows = read_rows(out)
    pairs = Counter((r["id"], r["rollout"]) for r in rows)
    assert len(pairs) == n_docs * 2, "rows lost"
    assert max(pairs.values()) == 1, "rows duplicated"
    # at most the requests in flight at each kill are sent twice
    assert _posts(out) <= n_docs * 2 + kills * IN_FLIGHT
    stats = read_stats(out)
    assert stats["rows_written"] == n_docs * 2 and stats["documents_written"] == n_docs
    assert not list((out / "data").glob(".*tmp*"))
    assert kills >= 3, f"the run finished too fast to be killed (seed {seed})"
    print(f"seed={seed} kills={kills} posts={_posts(out)} rows={len(rows)}")


def test_ctrl_c_saves_rows_and_stops_the_engine(tmp_path: Path, tiny_model: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"explain idea {i}"} for i in range(150)])
    out = tmp_path / "out"
    proc = _start_until_answers(_args(data, out, 32), tmp_path, out, 30)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "re-run the same command to resume" in stderr
    pids = _engine_pids(out)
    time.sleep(0.5)
    assert pids and not any(_alive(p) for p in pids)
    answered = len(read_rows(out))
    assert answered > 0, "rows answered before Ctrl-C were not flushed"
    session = read_stats(out)["sessions"][-1]
    assert session["status"] == "interrupted"
    final = subprocess.run(_args(data, out, 32), cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert final.returncode == 0, final.stderr
    pairs = Counter((r["id"], r["rollout"]) for r in read_rows(out))
    assert len(pairs) == 300 and max(pairs.values()) == 1
