"""Fault matrix, rollout side: an engine that dies mid-run stops a rollout run with one line
even when the user's rollout function catches every exception around generate(), and the
re-run, once the engine is back, finishes every row (through the fault server, a test double
that proxies to the real CPU engine and answers 500 while told to)."""

from __future__ import annotations

from pathlib import Path

import pytest
from checks import error_line
from conftest import forge_cli, read_rows, write_jsonl
from fault_server import FaultServer, endpoint_run_args

pytestmark = pytest.mark.slow

SWALLOWING = """
async def swallow(row, generate, ctx):
    try:
        answer = await generate(row["prompt"])
    except Exception:  # catches everything: forge's own failures must still stop the run
        return {"text": "fallback"}
    return {"text": answer.text}
"""


def test_a_dead_engine_stops_a_rollout_even_when_user_code_catches_everything(
    tmp_path: Path, cpu_server: dict, tiny_model: Path
) -> None:
    (tmp_path / "swallowing.py").write_text(SWALLOWING)
    ids = [f"s{i}" for i in range(40)]
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "prompt": f"swallowed prompt {i}"} for i in ids])
    out = tmp_path / "out"
    with FaultServer(cpu_server["url"], hang_s=10) as fs:
        args = [
            *endpoint_run_args(fs, tiny_model, "FORGE_TEST_KEY", data, out),
            "model.api_key_env=null",
            "rollout.fn=swallowing:swallow",
            "run.max_retries=0",
            "run.max_in_flight=4",
        ]
        fs.inject("500")
        proc = forge_cli(args, tmp_path)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "the model engine stopped answering: 16 requests in a row failed" in error_line(proc.stderr)
        fallback = [r for r in read_rows(out) if r["text"] == "fallback"]
        assert len(fallback) < 16  # the user kept the first failures; none after the engine was declared gone
        fs.clear()
        proc = forge_cli(args, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == sorted(ids)
