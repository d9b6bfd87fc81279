"""Fault matrix, batch stages and chaining (issue 21): a run dir written by one forge is refused to
a second (same command, or another setting with output.on_change=fresh), Slurm-task and step
locks included; a lone surrogate is quarantined by every stage; a secret in a rollout's error
never reaches rejected/; an unfinished run dir is refused as input (or read with
dataset.allow_unfinished, and said); a mix source the stage empties is named, never multiplied
into rejected/."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from checks import assert_no_secret, error_line
from conftest import forge_cli, read_rows, read_stats, run_batch_stage, write_jsonl

from forge.run.locks import RunBusy, run_lock, shard_lock, step_lock

pytestmark = pytest.mark.slow


SENTENCES = [
    "The old town sits by the river, and the people who live there walk to the market every morning.",
    "In the spring the rain comes often, so the farmers wait for a dry week before they plant the fields.",
    "A small library near the station is open late, and students read there until the last train leaves.",
    "When the bridge was rebuilt, the city kept the stones of the first one and used them for the new wall.",
    "Most of the shops close early on Sunday, but the bakery on the corner sells bread until the afternoon.",
    "The teacher asked the class to write about a place they love and to explain why it matters to them.",
]


def _docs(path: Path, n: int) -> Path:
    """n distinct documents of plain prose that curate's default filters keep."""
    rows = []
    for i in range(n):
        order = [SENTENCES[(i + k) % len(SENTENCES)] for k in range(5)]
        rows.append({"id": f"d{i}", "text": f"This is note number {i}. " + " ".join(order)})
    return write_jsonl(path, rows)


def _until(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the first forge ended before {what}: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_batch_stage_dir_is_refused_to_a_second_forge_and_never_moved_aside(tmp_path: Path) -> None:
    """curate is paused (SIGSTOP) mid-run after its first batches: the same command and a changed
    setting with output.on_change=fresh are both refused, nothing is moved to .stale/, and the
    first run, resumed, ends with every row exactly once."""
    data = _docs(tmp_path / "docs.jsonl", 1500)
    out = tmp_path / "cur"
    args = ["pipeline=curate", f"dataset.name={data}", f"output.dir={out}", "output.examples_per_chunk=100"]
    first = subprocess.Popen(
        [sys.executable, "-m", "forge.cli", "run.progress=false", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        state = out / "state" / "batch_00000.json"
        _until(lambda: state.exists() and json.loads(state.read_text())["batches"] >= 2, 120, "two batches", first)
        os.kill(first.pid, signal.SIGSTOP)
        same = forge_cli(args, tmp_path)
        fresh = forge_cli([*args, "curate.dedup_exact=false", "output.on_change=fresh"], tmp_path)
        for proc in (same, fresh):
            assert proc.returncode == 1, proc.stderr[-3000:]
            line = error_line(proc.stderr)
            assert "is being run right now by pid" in line and str(out) in line
        assert not (out / ".stale").exists(), "a refused fresh start moved the running dir aside"
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    kept = [r["source"]["id"] for r in read_rows(out)]
    assert len(kept) == len(set(kept)) == 1500
    assert (out / "state" / "finished.json").exists()


def test_slurm_task_step_and_finalize_locks_refuse_a_second_holder(tmp_path: Path) -> None:
    """The locks a Slurm task, a dedup step task and a finalize job hold: a second holder of the
    same one is refused naming the first; a local forge is refused while any is held."""
    with shard_lock(tmp_path, 1):
        with pytest.raises(RunBusy, match=r"shard 1 of .* pid \d+"):
            with shard_lock(tmp_path, 1):
                pass
    with step_lock(tmp_path, "buckets", 2):
        with pytest.raises(RunBusy, match=r"step buckets task 2 of .* pid \d+"):
            with step_lock(tmp_path, "buckets", 2):
                pass
        data = _docs(tmp_path / "docs.jsonl", 5)
        proc = forge_cli(["pipeline=dedup", f"dataset.name={data}", f"output.dir={tmp_path}"], tmp_path)
        assert proc.returncode == 1 and "is being run right now by pid" in error_line(proc.stderr)
    with run_lock(tmp_path):  # a finalize job
        with pytest.raises(RunBusy, match="being run right now"):
            with run_lock(tmp_path):
                pass


SURROGATE_ROWS = [
    {"messages": [{"role": "user", "content": "fine question"}, {"role": "assistant", "content": "fine answer"}]},
    {"messages": [{"role": "user", "content": "bad \ud800 question"}, {"role": "assistant", "content": "answer"}]},
    {"text": "a document with a bad \udfff surrogate in it"},
    {"text": "a clean document that stays"},
]


@pytest.mark.parametrize("stage", ["tokenize", "score", "embed", "dedup"])
def test_a_lone_surrogate_is_quarantined_by_every_stage(tmp_path: Path, tiny_model: Path, stage: str) -> None:
    """In process, through the runner's run object (the CLI path is the same runner)."""
    from forge.config import ForgeConfig, validate

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SURROGATE_ROWS))  # JSON escapes: \ud800 stays lone
    cfg = ForgeConfig()
    cfg.pipeline.stage = "score" if stage == "embed" else stage
    if stage == "embed":
        cfg.score.kind = "embed"
    cfg.dataset.name = str(data)
    cfg.output.dir = str(tmp_path / "out")
    cfg.run.progress = False
    validate(cfg)
    stats = run_batch_stage(cfg)
    rejected = read_rows(tmp_path / "out", "rejected")
    bad = [r for r in rejected if "lone surrogate" in r["reason"]]
    assert len(bad) == 2, rejected
    assert {r["filter"] for r in bad} == {"normalize"}
    assert any("messages[0].content" in r["reason"] for r in bad) and any("in text" in r["reason"] for r in bad)
    assert stats["rows_kept"] == 2


RAISING = """
async def leak(row, generate, ctx):
    raise RuntimeError(f"the upstream said no to key {ctx.options['api_key']} for {row['prompt']}")
"""


def test_a_secret_in_a_rollout_error_never_reaches_rejected(tmp_path: Path, cpu_server: dict) -> None:
    from conftest import endpoint_args

    secret = "sk-rolloutsecret-0123456789abcdef"
    (tmp_path / "leaky.py").write_text(RAISING)
    data = write_jsonl(tmp_path / "p.jsonl", [{"id": f"r{i}", "prompt": f"prompt {i}"} for i in range(4)])
    out = tmp_path / "out"
    args = [
        *endpoint_args(cpu_server),
        f"dataset.name={data}",
        f"output.dir={out}",
        "rollout.fn=leaky:leak",
        f"+rollout.options.api_key={secret}",
    ]
    proc = forge_cli(args, tmp_path)
    rejected = read_rows(out, "rejected")
    assert len(rejected) == 4 and all("the upstream said no to key ***" in r["reason"] for r in rejected), rejected
    assert_no_secret(out, [secret], proc.stdout, proc.stderr)


def test_an_unfinished_run_dir_is_refused_as_input_or_read_when_allowed(tmp_path: Path) -> None:
    """A curate run dir killed mid-run is refused by the next stage with one line naming it;
    dataset.allow_unfinished=true reads its whole chunks and says so in the log, stats and card;
    once the input is finished (and so changed), the "input changed" error is one short line."""
    data = _docs(tmp_path / "docs.jsonl", 1500)
    cur = tmp_path / "cur"
    args = ["pipeline=curate", f"dataset.name={data}", f"output.dir={cur}", "output.examples_per_chunk=100"]
    proc = subprocess.Popen([sys.executable, "-m", "forge.cli", "run.progress=false", *args], cwd=tmp_path)
    state = cur / "state" / "batch_00000.json"
    _until(lambda: state.exists() and json.loads(state.read_text())["batches"] >= 3, 120, "three batches")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cur / "state" / "finished.json").exists()
    tok = tmp_path / "tok"
    refused = forge_cli(["pipeline=tokenize", f"dataset.name={cur}", f"output.dir={tok}"], tmp_path)
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = error_line(refused.stderr)
    assert str(cur) in line and "is not finished" in line and "dataset.allow_unfinished" in line
    assert not tok.exists()

    dedup = tmp_path / "dd"
    allowed = ["pipeline=dedup", f"dataset.name={cur}", f"output.dir={dedup}", "dataset.allow_unfinished=true"]
    proc2 = forge_cli(allowed, tmp_path)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert "dataset.allow_unfinished: reading" in proc2.stderr
    stats = read_stats(dedup)
    assert str(cur) in stats["unfinished_inputs"] and 0 < stats["rows_in"] < 1500
    assert "Read from an unfinished input" in (dedup / "README.md").read_text()

    finished = forge_cli(args, tmp_path)  # resume the curate run to its end: its data/ changes
    assert finished.returncode == 0, finished.stderr[-3000:]
    again = forge_cli(allowed, tmp_path)
    assert again.returncode == 2
    line = error_line(again.stderr)
    assert "other settings" in line and len(line) < 400, line
    assert "\n" not in line


def test_a_mix_source_the_stage_empties_is_named_not_multiplied(tmp_path: Path) -> None:
    good = _docs(tmp_path / "good.jsonl", 60)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"id": f"e{i}", "text": "   "} for i in range(6)])
    sparse = write_jsonl(
        tmp_path / "sparse.jsonl",
        [{"id": f"s{i}", "text": "   " if i else "The one kept note. " + " ".join(SENTENCES)} for i in range(6)],
    )

    def mix(second: Path) -> list[str]:
        return [
            "pipeline=curate",
            f"+dataset.sources=[{{name: '{good}', label: good, weight: 1, format: text}},"
            f"{{name: '{second}', label: thin, weight: 1, format: text}}]",
            "dataset.target_rows=200",
        ]

    out = tmp_path / "a"
    proc = forge_cli([*mix(empty), f"output.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dataset.sources[1] (thin): the stage keeps none of this source's first rows" in proc.stderr
    thin = [r for r in read_rows(out, "rejected") if r["source"] == "thin"]
    assert sorted(r["where"] for r in thin) == sorted({r["where"] for r in thin}) and len(thin) == 6
    stats = read_stats(out)
    assert stats["mix"]["thin"]["short_of_share"] is True and stats["mix"]["thin"]["achieved_share"] == 0
    assert stats["by_source"]["thin"]["rows_in"] == 6  # read once: not multiplied by the pilot's pass rate

    out = tmp_path / "b"
    proc = forge_cli([*mix(sparse), f"output.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dataset.max_repeat" in proc.stderr
    rejected = [r for r in read_rows(out, "rejected") if r["source"] == "thin"]
    assert len(rejected) == len({r["where"] for r in rejected}) <= 5, "an input row is listed more than once"
    stats = read_stats(out)
    assert stats["mix"]["thin"]["short_of_share"] is True
    assert stats["removed_copies_not_listed"] > 0
    assert "short of its share" in (out / "README.md").read_text()
    kept = pq.read_table(sorted((out / "data").glob("*.parquet"))[0]).num_rows
    assert kept > 0
