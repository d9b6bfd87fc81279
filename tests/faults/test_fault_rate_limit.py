"""Adaptive concurrency against a provider's rate limit: the fault server (a test double in front
of the real CPU engine) limits requests with a token bucket, which a real engine cannot do; forge
starts at 16 in flight under a ceiling of 64 and must settle near the limit with few 429s, then
follow the limit when it drops mid-run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import read_rows, read_stats, write_jsonl
from fault_server import FaultServer, endpoint_run_args

pytestmark = pytest.mark.slow


def _rate(times: list[float], start: float, end: float) -> float:
    return sum(start <= t < end for t in times) / (end - start)


@pytest.mark.parametrize("headers", [True, False], ids=["rate-limit-headers", "retry-after-only"])
def test_throughput_settles_near_the_limit_and_follows_a_change(
    tmp_path: Path, cpu_server: dict, headers: bool
) -> None:
    first, second, n = 8.0, 4.0, 200
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"q{i}", "prompt": f"rate limited prompt {i}"} for i in range(n)])
    out = tmp_path / "out"
    with FaultServer(cpu_server["url"]) as fs:
        fs.rate_limit(first, burst=2, headers=headers)
        args = [
            *endpoint_run_args(fs, cpu_server["model"], "FORGE_TEST_KEY", data, out),
            "run.max_in_flight=64",
            "run.backoff_s=0.2",
            "run.progress=false",
        ]
        proc = subprocess.Popen(
            [sys.executable, "-m", "forge.cli", *args],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "FORGE_TEST_KEY": "sk-test"},
        )
        try:
            while sum(not s.limited for s in fs.seen) < 120 and proc.poll() is None:
                time.sleep(0.05)
            changed = time.monotonic()
            fs.rate_limit(second, burst=2, headers=headers)
            _, stderr = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
        seen = fs.seen
    assert proc.returncode == 0, stderr[-3000:]
    ids = Counter(r["id"] for r in read_rows(out))
    assert len(ids) == n and max(ids.values()) == 1
    ok = [s.at for s in seen if not s.limited]
    limited = sum(s.limited for s in seen)
    start = seen[0].at
    before = _rate(ok, start + 3.0, changed)  # after the first seconds of growth
    after = _rate(ok, changed + 4.0, ok[-1])  # once the cut has taken hold
    session = read_stats(out)["sessions"][-1]
    print(
        f"\nheaders={headers}: {before:.2f} req/s at a limit of {first}, {after:.2f} at {second}; "
        f"{limited} 429s for {len(ok)} answers ({limited / len(seen):.1%}); "
        f"concurrency peak {session.get('concurrency_peak')}, final {session.get('concurrency_final')}, "
        f"cuts {session.get('concurrency_cuts')}, pauses {session.get('rate_limit_pauses')}"
    )
    assert len(ok) == n  # every row answered once; 429s are retried, never quarantined
    assert 0.85 * first <= before <= first * 1.1
    assert 0.85 * second <= after <= second * 1.2
    assert session["concurrency_cuts"] >= 1 and session["concurrency_final"] < 64
    assert limited / len(seen) < (0.15 if headers else 0.3)
