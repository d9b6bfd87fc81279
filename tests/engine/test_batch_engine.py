"""model.engine=openai_batch through the real CLI against the batch API double (tests/batch_server.py),
whose every request is answered by the real CPU engine: batching, answers mapped back by custom
id, partial failures, an expired batch, and a kill after submitting that resumes by polling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from batch_server import BatchServer
from conftest import forge_cli, read_rows, read_stats, write_jsonl

pytestmark = pytest.mark.slow


def _setup(tmp_path: Path, server: BatchServer, model: str, n: int, *extra: str) -> tuple[list[str], Path]:
    rows = [{"id": f"b{i}", "prompt": f"batch prompt number {i}"} for i in range(n)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    return [
        "model=openai_batch",
        f"model.endpoint_url={server.url}",
        f"model.name_or_path={model}",
        "model.max_model_len=2048",
        "model.batch_poll_s=0.2",
        f"dataset.name={data}",
        "dataset.id_column=id",
        "generation.max_tokens=4",
        f"output.dir={out}",
        "output.examples_per_chunk=5",
        *extra,
    ], out


def test_batches_answer_every_row_retry_failures_and_quarantine_refusals(tmp_path: Path, cpu_server: dict) -> None:
    fail = {"batch prompt number 3", "batch prompt number 17"}
    refuse = {"batch prompt number 5"}
    with BatchServer(cpu_server["url"], fail_once=fail, refuse=refuse) as server:
        prices = ("model.price_in_per_mtok=1", "model.price_out_per_mtok=2")
        args, out = _setup(tmp_path, server, cpu_server["model"], 24, "model.batch_size=10", *prices)
        result = forge_cli(args, tmp_path, env={"OPENAI_API_KEY": "sk-batch-test"})
        assert result.returncode == 0, result.stderr[-3000:]
        batches = len(server.batches)
        sent = server.sent
    rows = read_rows(out)
    ids = Counter(r["id"] for r in rows)
    assert len(ids) == 23 and max(ids.values()) == 1 and "b5" not in ids
    # at half the prices given (model.batch_discount)
    assert all(r["cost_usd"] == pytest.approx((r["prompt_tokens"] * 0.5 + r["completion_tokens"] * 1.0) / 1e6)
               for r in rows)  # fmt: skip
    rejected = read_rows(out, "rejected")
    assert [(r["id"], r["stage"]) for r in rejected] == [("b5", "request")]
    assert "HTTP 400" in rejected[0]["reason"] and "refused by the batch double" in rejected[0]["reason"]
    status = subprocess.run([sys.executable, "-m", "forge.cluster.status", str(out)], capture_output=True, text=True)
    assert "spent so far: $" in status.stdout, status.stdout
    # 24 requests in batches of 10; the two that failed once go again with the last few or on their own
    assert batches in (3, 4)
    assert all(sent[f"batch prompt number {i}"] == 1 for i in range(24) if i != 5)  # each answered once
    session = read_stats(out)["sessions"][-1]
    assert session["batches_submitted"] == batches and session["batches_open"] == 0
    assert json.loads((out / "state" / "batches_00000" / "batches.json").read_text()) == {"batches": {}}
    written = [p for p in out.rglob("*") if p.is_file()]
    assert written and not [p for p in written if b"sk-batch-test" in p.read_bytes()]  # the key is in no file


def test_an_expired_batch_sends_only_what_it_did_not_answer(tmp_path: Path, cpu_server: dict) -> None:
    with BatchServer(cpu_server["url"], expire_after=4) as server:
        args, out = _setup(tmp_path, server, cpu_server["model"], 12)
        result = forge_cli(args, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert [b["status"] for b in server.batches.values()] == ["expired", "completed"]
        assert list(server.batches.values())[1]["request_counts"]["total"] == 8
        sent = server.sent
    assert len({r["id"] for r in read_rows(out)}) == 12 and sum(sent.values()) == 12


def test_killed_while_the_batch_runs_resumes_by_polling_not_resubmitting(tmp_path: Path, cpu_server: dict) -> None:
    with BatchServer(cpu_server["url"], delay_s=6.0) as server:
        args, out = _setup(tmp_path, server, cpu_server["model"], 10)
        proc = subprocess.Popen(
            [sys.executable, "-m", "forge.cli", "run.progress=false", *args],
            cwd=tmp_path,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        state = out / "state" / "batches_00000" / "batches.json"
        try:
            deadline = time.time() + 120
            while time.time() < deadline and not (state.exists() and json.loads(state.read_text())["batches"]):
                time.sleep(0.1)
            assert state.exists(), "no batch was submitted"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert not read_rows(out)
        status = subprocess.run(
            [sys.executable, "-m", "forge.cluster.status", str(out)], capture_output=True, text=True
        )
        assert status.returncode == 0, status.stderr
        assert "  batch batch_2 " in status.stdout and "10 requests, submitted" in status.stdout, status.stdout
        result = forge_cli(args, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "submitted by an earlier session; polling it" in (out / "forge.log").read_text()
        assert len(server.batches) == 1  # polled, not submitted again
        sent = server.sent
    assert len({r["id"] for r in read_rows(out)}) == 10 and sum(sent.values()) == 10


def test_a_multi_step_rollout_runs_step_by_step_in_batches(tmp_path: Path, cpu_server: dict) -> None:
    with BatchServer(cpu_server["url"]) as server:
        args, out = _setup(tmp_path, server, cpu_server["model"], 4, "rollout=critique_revise")
        result = forge_cli(args, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        sizes = [b["request_counts"]["total"] for b in server.batches.values()]
    rows = read_rows(out)
    assert len(rows) == 4 and all(r["requests"] == 3 and r["critiques"] for r in rows)
    assert sum(sizes) == 12 and len(sizes) == 3  # draft, critique, revise: one batch per step


def test_anthropic_message_batches(tmp_path: Path, cpu_server: dict) -> None:
    """model=anthropic_batch: Messages API params out, Anthropic's result lines back, with an
    errored (4xx: quarantined), an errored (5xx: sent again) and expired requests (sent again)."""
    with BatchServer(cpu_server["url"], fail_once={"batch prompt number 1"}, refuse={"batch prompt number 2"},
                     expire_after=6) as server:  # fmt: skip
        args, out = _setup(tmp_path, server, cpu_server["model"], 10, "prompt.system=Be brief.")
        args = [a.replace("model=openai_batch", "model=anthropic_batch") for a in args]
        result = forge_cli(args, tmp_path, env={"ANTHROPIC_API_KEY": "sk-ant-test"})
        assert result.returncode == 0, result.stderr[-3000:]
        batches = list(server.batches.values())
        sent = server.sent
    assert [b["processing_status"] for b in batches] == ["ended", "ended"]
    assert batches[0]["request_counts"]["expired"] == 4 and batches[0]["request_counts"]["errored"] == 2
    assert batches[1]["request_counts"]["processing"] == 0 and batches[1]["request_counts"]["succeeded"] == 5
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == sorted(f"b{i}" for i in range(10) if i != 2)
    assert all(r["completion_tokens"] > 0 and r["messages"][0]["role"] == "system" for r in rows)
    assert [(r["id"], r["stage"]) for r in read_rows(out, "rejected")] == [("b2", "request")]
    assert all(sent[f"batch prompt number {i}"] == 1 for i in range(10) if i != 2)
