"""Fault matrix, rollout side: an engine that dies mid-run stops a rollout run with one line
even when the user's rollout function catches every exception around generate(), and the
re-run, once the engine is back, finishes every row; a step that hangs is cut off by
rollout.timeout_s (through the fault server, a test double that proxies to the real CPU engine
and answers 500, or never answers, while told to)."""

from __future__ import annotations

import time
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


HANGING = """
import asyncio
import os


async def two_steps(row, generate, ctx):
    draft = await generate(row["prompt"], step="draft")
    if row["id"] == "t2" and os.path.exists(ctx.options["flag"]):
        await asyncio.Event().wait()  # a tool of the user's that never answers
    short = await generate(
        [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": draft.text},
         {"role": "user", "content": "Shorter: " + row["id"]}],
        step="shorten",
    )
    return {"draft": draft.text, "short": short.text}
"""


def test_a_hanging_step_is_cut_off_by_rollout_timeout_and_resumed_from_the_cache(
    tmp_path: Path, cpu_server: dict, tiny_model: Path
) -> None:
    (tmp_path / "hanging.py").write_text(HANGING)
    flag = tmp_path / "tool_hangs"
    flag.write_text("")
    ids = [f"t{i}" for i in range(6)]
    prompts = {i: f"hanging rollout prompt {i}" for i in ids}
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "prompt": prompts[i]} for i in ids])
    out = tmp_path / "out"
    with FaultServer(cpu_server["url"], hang_s=120) as fs:
        args = [
            *endpoint_run_args(fs, tiny_model, "FORGE_TEST_KEY", data, out),
            "model.api_key_env=null",
            "rollout.fn=hanging:two_steps",
            f"+rollout.options.flag={flag}",
            "run.max_in_flight=2",  # the two hung requests hold every slot until they are cancelled
        ]
        fs.inject("hang", prompts=["Shorter: t1", "Shorter: t4"])  # step 2 of t1 and t4 never answers
        started = time.monotonic()
        proc = forge_cli([*args, "rollout.timeout_s=3"], tmp_path, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert time.monotonic() - started < 90  # not the 120 s hang: the requests were cancelled
        assert sorted(r["id"] for r in read_rows(out)) == ["t0", "t3", "t5"]
        rejected = {r["id"]: r for r in read_rows(out, "rejected")}
        assert sorted(rejected) == ["t1", "t2", "t4"]
        assert all(r["stage"] == "rollout" and r["retryable"] for r in rejected.values())
        for i in ("t1", "t4"):
            assert rejected[i]["step"] == "step 2 (shorten)"
            assert rejected[i]["reason"] == (
                "timed out after rollout.timeout_s=3 s in step 2 (shorten), waiting for the engine; cancelled"
            )
        assert rejected["t2"]["reason"] == (
            "timed out after rollout.timeout_s=3 s in step 1 (draft), after its answer (in the rollout's own "
            "code); cancelled"
        )
        first = fs.counts()
        assert all(first[prompts[i]] == 1 for i in ids) and first["Shorter: t2"] == 0

        # the engine and the tool answer again; a larger limit is not a change of settings: the
        # re-run retries the three, their drafts from the cache, and sends only their step 2
        fs.clear()
        flag.unlink()
        proc = forge_cli([*args, "rollout.timeout_s=60"], tmp_path, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        again = fs.counts()
    assert sorted(r["id"] for r in read_rows(out)) == ids
    assert read_rows(out, "rejected") == []
    assert all(again[prompts[i]] == 1 for i in ids)  # no draft sent twice
    assert again - first == {"Shorter: t1": 1, "Shorter: t2": 1, "Shorter: t4": 1}
