"""Fault matrix, engine side: forge (real CLI, `model.engine=endpoint`) against the fault server,
a test double that proxies to the real CPU engine and injects, per prompt, what a real engine
cannot be made to do on demand. One test per fault class; each checks the exit code, what the
quarantine says, that no row is lost or duplicated after the re-run, that nothing already
answered is sent again, and that the API key (a canary) is in no file and no output stream."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from checks import assert_exactly_once, assert_no_secret, error_line, rows_of
from conftest import forge_cli, read_stats, write_jsonl
from fault_server import FaultServer, endpoint_run_args

pytestmark = pytest.mark.slow

CANARY = "sk-canaryFORGEfaultMATRIX0123456789abcdef"
KEY_ENV = "FORGE_TEST_KEY"
N = 12
IDS = [f"r{i}" for i in range(N)]
PROMPTS = {i: f"fault matrix prompt number {i}" for i in IDS}
MAX_RETRIES = 2


@pytest.fixture
def faults(cpu_server: dict):
    with FaultServer(cpu_server["url"], hang_s=10) as fs:
        yield fs


def _setup(tmp_path: Path, fs: FaultServer, model: str, *extra: str) -> tuple[list[str], Path]:
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "prompt": PROMPTS[i]} for i in IDS])
    out = tmp_path / "out"
    args = [
        *endpoint_run_args(fs, model, KEY_ENV, data, out),
        "run.request_timeout_s=2",
        f"run.max_retries={MAX_RETRIES}",
        "run.backoff_s=0.1",
        "run.max_in_flight=4",
        *extra,
    ]
    return args, out


def _forge(args: list[str], tmp_path: Path, fs: FaultServer, out: Path):
    proc = forge_cli(args, cwd=tmp_path, env={KEY_ENV: CANARY})
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert_no_secret(out, [CANARY], proc.stdout, proc.stderr)
    assert f"Bearer {CANARY}" in fs.authorizations(), "the key never reached the server: the canary proves nothing"
    return proc


def _counts(fs: FaultServer) -> dict[str, int]:
    by_prompt = fs.counts()
    assert set(by_prompt) <= set(PROMPTS.values()), f"unexpected prompts at the server: {set(by_prompt)}"
    return {i: by_prompt[PROMPTS[i]] for i in IDS}


REASONS = {
    "malformed": "malformed 200 response",
    "no_choices": "malformed 200 response",
    "500": "HTTP 500",
    "hang": "timed out after 2 s",
}


@pytest.mark.parametrize("kind", list(REASONS))
def test_transient_fault_retried_persistent_one_quarantined_then_completed(
    kind: str, tmp_path: Path, faults: FaultServer, tiny_model: Path
) -> None:
    """r1 meets the fault once (retried, completes); r2 meets it every time (retries used up,
    quarantined as retryable with the reason); the run goes on and exits 0. A re-run with the
    fault gone sends only r2's request, and r2 then counts as written, not rejected."""
    once, always = "r1", "r2"
    faults.inject(kind, prompts=[PROMPTS[once]], times=1)
    faults.inject(kind, prompts=[PROMPTS[always]])
    args, out = _setup(tmp_path, faults, str(tiny_model))
    proc = _forge(args, tmp_path, faults, out)
    assert proc.returncode == 0, proc.stderr[-3000:]

    sent = _counts(faults)
    assert sent[once] == 2 and sent[always] == 1 + MAX_RETRIES
    assert all(n == 1 for i, n in sent.items() if i not in (once, always)), sent
    assert sorted(r["id"] for r in rows_of(out)) == sorted(i for i in IDS if i != always)
    (rej,) = rows_of(out, "rejected")
    assert (rej["id"], rej["rollout"], rej["stage"], rej["retryable"]) == (always, 0, "request", True)
    assert REASONS[kind] in rej["reason"] and f"gave up after {MAX_RETRIES} retries" in rej["reason"], rej["reason"]
    assert_exactly_once(out, IDS)
    stats = read_stats(out)
    assert stats["documents_rejected"] == 1 and stats["rejected_by_stage"] == {"request": 1}
    assert stats["sessions"][-1]["retries"] == 1 + MAX_RETRIES

    faults.clear()  # the engine is healthy again
    proc = _forge(args, tmp_path, faults, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resent = _counts(faults)
    assert resent[always] == sent[always] + 1, "the quarantined row was not retried"
    assert {i: n for i, n in resent.items() if i != always} == {i: n for i, n in sent.items() if i != always}, (
        "a finished row was sent again"
    )
    assert_exactly_once(out, IDS, rejected_ok=False)
    assert [r for r in rows_of(out, "rejected") if r["id"] == always] == [], "rejected/ still holds the completed row"
    stats = read_stats(out)
    assert stats["rows_written"] == N and stats["documents_written"] == N
    assert stats["documents_rejected"] == 0 and stats["rejected_rows"] == 0, stats
    assert stats["sessions"][-1]["requests_sent"] == 1


def test_429_retry_after_is_waited_out(tmp_path: Path, faults: FaultServer, tiny_model: Path) -> None:
    """Two 429s with `Retry-After: 1` on one row: each retry comes about 1 s later (the header,
    not run.backoff_s=0.1, sets the pause); the row completes within max_retries=2."""
    hit = "r3"
    faults.inject("429", prompts=[PROMPTS[hit]], times=2)
    args, out = _setup(tmp_path, faults, str(tiny_model))
    proc = _forge(args, tmp_path, faults, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    at = faults.arrivals(PROMPTS[hit])
    assert len(at) == 3
    gaps = [b - a for a, b in zip(at, at[1:], strict=False)]
    assert all(0.9 <= g <= 2.5 for g in gaps), f"Retry-After: 1 not honoured: gaps {gaps}"
    sent = _counts(faults)
    assert all(n == 1 for i, n in sent.items() if i != hit), sent
    assert_exactly_once(out, IDS, rejected_ok=False)
    session = read_stats(out)["sessions"][-1]
    assert session["retries"] == 2 and session["retry_reasons"] == {"HTTP 429": 2}


def test_content_null_is_flagged_counted_and_survives_replay(
    tmp_path: Path, faults: FaultServer, tiny_model: Path
) -> None:
    """A real answer with `content: null`: written (not retried, not quarantined) with text ""
    and content_null=true, counted in stats.json; replayed from the cache with the flag kept."""
    hit = "r4"
    faults.inject("content_null", prompts=[PROMPTS[hit]])
    args, out = _setup(tmp_path, faults, str(tiny_model))
    proc = _forge(args, tmp_path, faults, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(n == 1 for n in _counts(faults).values())
    assert_exactly_once(out, IDS, rejected_ok=False)
    rows = {r["id"]: r for r in rows_of(out)}
    assert rows[hit]["text"] == "" and rows[hit]["content_null"] is True
    assert rows[hit]["completion_tokens"] > 0  # the engine's real usage is kept
    assert not any(r["content_null"] for i, r in rows.items() if i != hit)
    assert read_stats(out)["content_null_rows"] == 1
    # lose the shard holding it: replayed from the request cache, flag intact, nothing sent
    shard = next(f for f in sorted((out / "data").glob("*.parquet")) if hit in {r["id"] for r in _rows_in(f)})
    os.unlink(shard)
    total = faults.total
    proc = _forge(args, tmp_path, faults, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert faults.total == total
    assert_exactly_once(out, IDS, rejected_ok=False)
    rows = {r["id"]: r for r in rows_of(out)}
    assert rows[hit]["text"] == "" and rows[hit]["content_null"] is True
    stats = read_stats(out)
    assert stats["content_null_rows"] == 1 and stats["sessions"][-1]["requests_sent"] == 0


def _rows_in(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def test_an_engine_that_stops_answering_stops_the_run(tmp_path: Path, faults: FaultServer, tiny_model: Path) -> None:
    """Every request fails (a dead endpoint answering 500): after 16 in a row forge stops with exit
    1 and one line instead of quarantining every row; the re-run, once it is back, finishes all."""
    ids = [f"d{i}" for i in range(40)]
    data = write_jsonl(tmp_path / "dead.jsonl", [{"id": i, "prompt": f"dead endpoint prompt {i}"} for i in ids])
    out = tmp_path / "dead"
    args = [
        *endpoint_run_args(faults, tiny_model, KEY_ENV, data, out),
        "run.request_timeout_s=2",
        f"run.max_retries={MAX_RETRIES}",
        "run.backoff_s=0.05",
        "run.max_in_flight=4",
    ]
    faults.inject("500")
    proc = _forge(args, tmp_path, faults, out)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "stopped answering" in error_line(proc.stderr)
    assert "nothing finished was lost" in proc.stderr
    quarantined = rows_of(out, "rejected")
    assert 16 <= len(quarantined) < len(ids) and all(r["retryable"] for r in quarantined)
    faults.clear()
    proc = _forge(args, tmp_path, faults, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_exactly_once(out, ids, rejected_ok=False)
    assert rows_of(out, "rejected") == []
