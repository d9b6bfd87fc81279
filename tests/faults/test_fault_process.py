"""Fault matrix, process side: the real `forge` CLI killed, interrupted, run twice at once, its
engine killed, a finished shard deleted. Endpoint runs go through the fault server (a test double
proxying to the real CPU engine) slowed by a per-request delay, so a small input is still mid-run
when the fault strikes, and so the requests each prompt got can be counted: nothing already
answered may be sent again. Each test ends with every row exactly once and no secret anywhere."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from checks import assert_exactly_once, assert_no_secret, error_line, rows_of
from conftest import forge_cli, read_stats, write_jsonl
from fault_server import FaultServer, endpoint_run_args, small_run_args

pytestmark = pytest.mark.slow

CANARY = "sk-canaryFORGEprocessFAULTS0123456789abcd"
KEY_ENV = "FORGE_TEST_KEY"
HF_CANARY = "hf_canaryFORGEprocessFAULTS0123456789abcd"  # for runs with forge's own engine
IN_FLIGHT = 4
DELAY_S = 0.05


@pytest.fixture
def faults(cpu_server: dict):
    with FaultServer(cpu_server["url"], delay_s=DELAY_S) as fs:
        yield fs


def _inputs(tmp_path: Path, n: int) -> tuple[Path, list[str], dict[str, str]]:
    ids = [f"doc{i}" for i in range(n)]
    prompts = {i: f"process fault prompt {i}" for i in ids}
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "prompt": prompts[i]} for i in ids])
    return data, ids, prompts


def _endpoint_args(fs: FaultServer, model: Path, data: Path, out: Path) -> list[str]:
    return [
        *endpoint_run_args(fs, model, KEY_ENV, data, out),
        f"run.max_in_flight={IN_FLIGHT}",
        "run.request_timeout_s=10",
    ]


def _engine_args(data: Path, out: Path, *extra: str) -> list[str]:
    """forge starts and supervises its own `transformers serve` of the tiny model. Retries are
    short (as in the endpoint matrix): a restart must not spend them (README: "While the engine
    restarts, requests wait instead of spending retries")."""
    return [
        "model.engine=transformers",
        *small_run_args(data, out),
        f"run.max_in_flight={IN_FLIGHT}",
        "run.max_retries=2",
        *extra,
    ]


ENV = {KEY_ENV: CANARY, "HF_TOKEN": HF_CANARY}
SECRETS = [CANARY, HF_CANARY]


class Forge:
    """The real CLI in its own session (so a signal reaches its whole process group), with its
    output in files (a pipe nobody reads could fill and stall it)."""

    def __init__(self, args: list[str], cwd: Path, name: str) -> None:
        self.stdout_path, self.stderr_path = cwd / f"{name}.stdout", cwd / f"{name}.stderr"
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "forge.cli", "run.progress=false", *args],
                cwd=cwd,
                stdout=out,
                stderr=err,
                env={**os.environ, **ENV},
                start_new_session=True,
            )

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            raise

    def kill(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()


@pytest.fixture
def forges():
    """Every forge a test starts is SIGKILLed (with its group) if the test ends early."""
    started: list[Forge] = []

    def start(args: list[str], cwd: Path, name: str = "forge") -> Forge:
        started.append(Forge(args, cwd, name))
        return started[-1]

    yield start
    for f in started:
        if f.running:
            f.kill(signal.SIGKILL)
            f.proc.wait(10)


def _until(pred: Callable[[], bool], timeout: float, what: str, proc: Forge | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc is not None and not proc.running:
            raise AssertionError(f"forge ended (exit {proc.proc.returncode}) before {what}:\n{proc.stderr[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _shards(out: Path) -> list[Path]:
    return sorted((out / "data").glob("*.parquet")) if (out / "data").is_dir() else []


def _rerun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = forge_cli(args, cwd=cwd, env=ENV, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc


def _assert_failed(stderr: str, *needles: str) -> str:
    """The error-line contract: one `forge: error:` line naming the thing, then at once the
    `forge: nothing finished was lost; ...` line; no traceback."""
    line = error_line(stderr)
    for needle in needles:
        assert needle in line, f"{needle!r} not in the error line {line!r}"
    lines = stderr.splitlines()
    after = lines[lines.index(line) + 1] if lines.index(line) + 1 < len(lines) else ""
    assert after.startswith("forge: nothing finished was lost;"), f"after the error line comes {after!r}"
    return line


def _assert_nothing_answered_resent(fs: FaultServer, prompts: dict[str, str], before: set[str]) -> None:
    """Every prompt reached the engine; only requests in flight at the fault went twice; rows
    already written before it went once."""
    counts = fs.counts()
    assert set(counts) == set(prompts.values()), "a prompt never reached the engine"
    twice = [p for p, n in counts.items() if n > 1]
    assert max(counts.values()) <= 2 and len(twice) <= IN_FLIGHT, f"re-sent: {twice}"
    assert all(counts[prompts[i]] == 1 for i in before), "a row written before the fault was sent again"


def test_sigkill_at_a_random_moment_then_resume(tmp_path: Path, faults: FaultServer, tiny_model: Path, forges):
    n = 150
    data, ids, prompts = _inputs(tmp_path, n)
    out = tmp_path / "out"
    args = _endpoint_args(faults, tiny_model, data, out)
    seed = int(os.environ.get("FORGE_KILL_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    proc = forges(args, tmp_path)
    _until(lambda: len(_shards(out)) >= 2, 60, "two shards", proc)
    time.sleep(rng.uniform(0, 1.0))
    assert proc.running, f"the run finished before the kill (seed {seed})"
    proc.kill(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    before = {r["id"] for r in rows_of(out)}
    assert 0 < len(before) < n, f"seed {seed}: {len(before)} rows before the kill"
    faults.delay_s = 0
    final = _rerun(args, tmp_path)
    assert_exactly_once(out, ids, rejected_ok=False)
    _assert_nothing_answered_resent(faults, prompts, before)
    session = read_stats(out)["sessions"][-1]
    assert session["requests_sent"] + session["cache_hits"] == n - len(before)
    # stats.json agrees with what the server saw: the prompts it got before the kill were either
    # answered in the cache (replayed, not sent) or in flight (sent again, at most IN_FLIGHT)
    twice = sum(1 for c in faults.counts().values() if c == 2)
    seen_before_kill = n - (session["requests_sent"] - twice)
    assert seen_before_kill - twice == len(before) + session["cache_hits"], (session, twice)
    assert read_stats(out)["rows_written"] == n
    assert not list((out / "data").glob(".*tmp*"))
    assert_no_secret(out, SECRETS, final.stdout, final.stderr, proc.stdout, proc.stderr)
    print(f"seed={seed} rows_before={len(before)} requests={faults.total}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_sigint_save_finished_rows_exit_130(
    sig: int, tmp_path: Path, faults: FaultServer, tiny_model: Path, forges
):
    n = 120
    data, ids, prompts = _inputs(tmp_path, n)
    out = tmp_path / "out"
    args = _endpoint_args(faults, tiny_model, data, out)
    proc = forges(args, tmp_path)
    _until(lambda: len(_shards(out)) >= 2, 60, "two shards", proc)
    proc.kill(sig)
    assert proc.wait(30) == 130, proc.stderr[-3000:]
    stderr = proc.stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    said = [ln for ln in stderr.splitlines() if "finished rows are saved" in ln]
    assert len(said) == 1 and said[0].startswith("forge: "), stderr[-3000:]
    assert not [ln for ln in stderr.splitlines() if ln.startswith("forge: error:")]
    before = {r["id"] for r in rows_of(out)}
    assert 0 < len(before) < n
    assert len(before) == len(rows_of(out)), "a row was saved twice"
    assert read_stats(out)["sessions"][-1]["status"] == "interrupted"
    faults.delay_s = 0
    final = _rerun(args, tmp_path)
    assert_exactly_once(out, ids, rejected_ok=False)
    _assert_nothing_answered_resent(faults, prompts, before)
    assert_no_secret(out, SECRETS, final.stdout, final.stderr, proc.stdout, stderr)


def _engine_pids(out: Path) -> list[int]:
    log = out / "forge.log"
    return [int(p) for p in re.findall(r"engine pid (\d+)", log.read_text())] if log.exists() else []


def _posts(out: Path) -> int:
    logs = out / "logs"
    if not logs.is_dir():
        return 0
    return sum(f.read_text(errors="replace").count('"POST /v1/chat/completions') for f in logs.glob("engine_*.log"))


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _kill_engine_mid_run(out: Path, proc: Forge, answered: int = 10) -> int:
    _until(lambda: _posts(out) >= answered and bool(_engine_pids(out)), 120, f"{answered} answers", proc)
    assert proc.running, "the run finished before the engine could be killed"
    pid = _engine_pids(out)[0]
    os.killpg(pid, signal.SIGKILL)  # the engine runs in its own process group
    return pid


def test_engine_killed_mid_run_is_restarted(tmp_path: Path, tiny_model: Path, forges):
    n = 150
    data, ids, _ = _inputs(tmp_path, n)
    out = tmp_path / "out"
    # retries that fail fast (10 ms backoff): any the restart spends show up, not only when the
    # kill happens to fall just before the supervisor's next look (it polls every 0.5 s)
    proc = forges(_engine_args(data, out, "run.backoff_s=0.01"), tmp_path)
    first = _kill_engine_mid_run(out, proc)
    assert proc.wait(180) == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    pids = _engine_pids(out)
    assert len(pids) == 2 and pids[0] == first, pids
    assert not any(_alive(p) for p in pids)
    assert "engine died" in (out / "forge.log").read_text()
    assert_no_secret(out, SECRETS, proc.stdout, proc.stderr)
    stats = read_stats(out)
    assert stats["sessions"][-1]["engine_restarts"] == 1
    spent = [(r["id"], r["reason"][:90]) for r in rows_of(out, "rejected")]
    assert not spent, f"{len(spent)} requests spent their retries on the restarting engine, quarantined: {spent[:3]}"
    assert_exactly_once(out, ids, rejected_ok=False)
    assert stats["rows_written"] == n


def test_engine_dead_for_good_fails_clearly_then_resumes(tmp_path: Path, tiny_model: Path, forges):
    n = 150
    data, ids, _ = _inputs(tmp_path, n)
    out = tmp_path / "out"
    args = _engine_args(data, out, "model.max_restarts=0", "run.backoff_s=0.1")
    proc = forges(args, tmp_path)
    _kill_engine_mid_run(out, proc)
    assert proc.wait(120) == 1, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert "engine died" in line and "model.max_restarts=0" in line, line
    saved = {r["id"] for r in rows_of(out)}
    assert saved, "rows answered before the engine died were not flushed"
    assert len(saved) == len(rows_of(out)), "a row was saved twice"
    final = _rerun(args, tmp_path)
    assert_exactly_once(out, ids, rejected_ok=False)
    assert read_stats(out)["rows_written"] == n
    assert not any(_alive(p) for p in _engine_pids(out))
    assert_no_secret(out, SECRETS, proc.stdout, proc.stderr, final.stdout, final.stderr)
    _assert_failed(proc.stderr, "engine died", "model.max_restarts=0")  # last: the contract's exact shape


def test_deleted_shard_is_replayed_from_the_cache(tmp_path: Path, faults: FaultServer, tiny_model: Path):
    n = 30
    data, ids, _ = _inputs(tmp_path, n)
    out = tmp_path / "out"
    faults.delay_s = 0
    args = _endpoint_args(faults, tiny_model, data, out)
    _rerun(args, tmp_path)
    shards = _shards(out)
    assert len(shards) == n // 5
    lost = {r["id"]: r for r in pq.read_table(shards[2]).to_pylist()}
    shards[2].unlink()
    sent = faults.total
    final = _rerun(args, tmp_path)
    assert faults.total == sent, "a cached answer was requested again"
    session = read_stats(out)["sessions"][-1]
    assert session["requests_sent"] == 0 and session["cache_hits"] == len(lost) == 5
    assert_exactly_once(out, ids, rejected_ok=False)
    (new,) = set(_shards(out)) - set(shards)
    again = {r["id"]: r for r in pq.read_table(new).to_pylist()}
    assert set(again) == set(lost), "the re-run wrote other rows than the lost shard's"
    assert {i: r["text"] for i, r in again.items()} == {i: r["text"] for i, r in lost.items()}
    assert read_stats(out)["rows_written"] == n
    assert_no_secret(out, SECRETS, final.stdout, final.stderr)


def test_second_process_on_the_same_run_dir_is_refused(tmp_path: Path, faults: FaultServer, tiny_model: Path, forges):
    n = 100
    data, ids, prompts = _inputs(tmp_path, n)
    out = tmp_path / "out"
    args = _endpoint_args(faults, tiny_model, data, out)
    faults.delay_s = 0.3  # 100 * 0.3 / IN_FLIGHT = 7.5 s: still running while two more are refused
    first = forges(args, tmp_path, "first")
    _until(lambda: len(_shards(out)) >= 1, 60, "a first shard", first)
    record = {name: (out / name).read_bytes() for name in ("config.yaml", "command.json")}
    second = forge_cli(args, cwd=tmp_path, env=ENV, timeout=120)
    # the same dir with other settings while the first has rows in flight: refused before writing
    other = forge_cli([*args, "generation.max_tokens=5"], cwd=tmp_path, env=ENV, timeout=120)
    assert first.running, "the first run ended before the second one was started"
    for proc in (second, other):
        assert proc.returncode not in (0, 130), proc.stderr[-3000:]
        _assert_failed(proc.stderr, "being run right now", str(out))
    assert {name: (out / name).read_bytes() for name in record} == record, "a refused run rewrote the record"
    assert first.wait(120) == 0, first.stderr[-3000:]
    assert_exactly_once(out, ids, rejected_ok=False)
    assert all(n_ == 1 for n_ in faults.counts().values()) and len(faults.counts()) == n
    assert read_stats(out)["rows_written"] == n
    assert_no_secret(out, SECRETS, first.stdout, first.stderr, second.stdout, second.stderr, other.stderr)
