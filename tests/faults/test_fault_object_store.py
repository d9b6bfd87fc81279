"""Faults of an object store (the real moto_server behind the FaultyStore double): 500s and slow
answers are retried with bounded backoff; a write denied mid-run is one line and the re-run
resumes; kill -9 in the middle of an upload, then a resume from another machine (a fresh scratch
dir), ends with every row exactly once; generation's paid answers reach the other machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import chat_rows as chats
from conftest import endpoint_args, forge_cli, read_rows
from faults.checks import error_line
from object_store import assert_no_secret_in_bucket, once, put_jsonl, put_parquet, remote_files, remote_rows

pytestmark = pytest.mark.slow


def _curate(src: str, out: str, *extra: str) -> list[str]:
    return ["pipeline=curate", f"dataset.name={src}", f"output.dir={out}", "output.examples_per_chunk=25", *extra]


def _input(s3, rows: int = 200) -> tuple[str, list[str]]:  # noqa: ANN001
    bucket = s3.bucket("fault")
    data = chats(rows)
    put_parquet(s3.fs(), f"{bucket}/in/a.parquet", data)
    return bucket, [r["id"] for r in data]


def _source_ids(fs, run: str) -> list[str]:  # noqa: ANN001
    return [r["source"]["id"] for r in remote_rows(fs, run)]


def test_500s_and_slow_answers_are_retried_and_the_run_completes(s3, tmp_path: Path) -> None:
    bucket, ids = _input(s3)
    s3.faults.inject(method="PUT", path=r"/data/", status=500, times=3)
    s3.faults.inject(method="GET", path=r"/in/a\.parquet", status=503, times=2)
    s3.faults.inject(method="PUT", path=r"/state/batch_", delay_s=2.5, times=1)
    args = _curate(f"s3://{bucket}/in/", f"s3://{bucket}/runs/r", "storage.timeout_s=1", "storage.backoff_s=0.1")
    proc = forge_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(f.fired == f.times for f in s3.faults.faults)
    got = _source_ids(s3.fs(), f"{bucket}/runs/r")
    once(got)
    assert sorted(got) == sorted(ids)


def test_a_write_denied_mid_run_is_one_line_and_the_rerun_resumes(s3, tmp_path: Path) -> None:
    bucket, ids = _input(s3)
    run = f"{bucket}/runs/r"
    s3.faults.inject(method="PUT", path=r"/data/00000_00003\.parquet", status=403)
    proc = forge_cli(_curate(f"s3://{bucket}/in/", f"s3://{run}"), tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert f"s3://{run}" in line and "access denied" in line and "data/00000_00003.parquet" in line, line
    fs = s3.fs()
    assert "state/finished.json" not in remote_files(fs, run)
    s3.faults.clear()
    # the re-run on another machine (a fresh scratch) goes on from what the store holds
    again = forge_cli(
        _curate(f"s3://{bucket}/in/", f"s3://{run}"), tmp_path, env={"FORGE_SCRATCH": str(tmp_path / "b")}
    )
    assert again.returncode == 0, again.stderr[-3000:]
    got = _source_ids(fs, run)
    once(got)
    assert sorted(got) == sorted(ids)
    assert_no_secret_in_bucket(fs, bucket, proc.stderr, again.stderr)


@pytest.mark.parametrize("chunk", ["data/00000_00002.parquet", "state/batch_00000.json"])
def test_kill_9_during_an_upload_then_resume_on_another_machine(s3, tmp_path: Path, chunk: str) -> None:
    bucket, ids = _input(s3, 300)
    run = f"{bucket}/runs/r"
    hang = s3.faults.inject(method="PUT", path="/" + chunk.replace(".", r"\."), delay_s=20, drop=True, times=1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "forge.cli", "run.progress=false", *_curate(f"s3://{bucket}/in/", f"s3://{run}")],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "FORGE_SCRATCH": str(tmp_path / "a")},
    )
    assert hang.hit.wait(120), "the upload never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    s3.faults.clear()
    fs = s3.fs()
    partial = remote_files(fs, run)
    assert "state/finished.json" not in partial and "state/run.lease" in partial
    t0 = time.monotonic()
    again = forge_cli(
        _curate(f"s3://{bucket}/in/", f"s3://{run}"), tmp_path, env={"FORGE_SCRATCH": str(tmp_path / "b")}
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert time.monotonic() - t0 < 60  # the dead holder's lease did not have to run out
    got = _source_ids(fs, run)
    once(got)
    assert sorted(got) == sorted(ids)
    assert "state/run.lease" not in remote_files(fs, run)


def test_generation_on_the_store_replays_paid_answers_on_another_machine(s3, cpu_server: dict, tmp_path: Path) -> None:
    fs = s3.fs()
    bucket = s3.bucket("gen")
    put_jsonl(fs, f"{bucket}/in/prompts.jsonl", [{"id": f"p{i}", "prompt": f"Say {i} twice."} for i in range(12)])
    run = f"{bucket}/runs/gen"
    args = [f"dataset.name=s3://{bucket}/in/prompts.jsonl", "dataset.id_column=id", f"output.dir=s3://{run}"]
    args += ["output.examples_per_chunk=4"]
    args += [*endpoint_args(cpu_server), "generation.max_tokens=8"]
    first = forge_cli(args, tmp_path, env={"FORGE_SCRATCH": str(tmp_path / "a")})
    assert first.returncode == 0, first.stderr[-3000:]
    files = remote_files(fs, run)
    assert [f for f in files if f.startswith("cache/task_00000.seg/")], files
    assert not [f for f in files if f.endswith(".sqlite")]
    answers = {r["id"]: r["text"] for r in remote_rows(fs, run)}
    assert sorted(answers) == sorted(f"p{i}" for i in range(12))
    # the chunks are lost; another machine, with no engine reachable at all, replays every answer
    for path in fs.glob(f"{run}/data/*.parquet") + [f"{run}/state/finished.json"]:
        fs.rm(path)
    dead = [a if not a.startswith("model.endpoint_url=") else "model.endpoint_url=http://127.0.0.1:9" for a in args]
    again = forge_cli(dead, tmp_path, env={"FORGE_SCRATCH": str(tmp_path / "b")})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "replayed from the request cache" in again.stderr
    assert {r["id"]: r["text"] for r in remote_rows(fs, run)} == answers


@pytest.mark.parametrize("stage", ["dedup", "tokenize"])
def test_kill_9_at_random_moments_each_resumed_on_a_fresh_machine(
    s3, tiny_model: Path, tmp_path: Path, stage: str
) -> None:
    """Killed three times at random moments, each re-run on a fresh scratch dir (another machine):
    the store ends with exactly the rows, steps and shards of an uninterrupted local run."""
    import random

    from forge.stages.dedup.planted import write

    fs = s3.fs()
    bucket = s3.bucket(stage[:5])
    planted = tmp_path / "planted"
    planted.mkdir()
    write(planted, 600, seed=11)
    fs.put(str(planted / "a.jsonl"), f"{bucket}/in/a.jsonl")
    stage_args = {
        "dedup": ["pipeline=dedup", "dedup.minhash.threshold=0.7", "output.examples_per_chunk=50"],
        "tokenize": ["pipeline=tokenize", f"tokenize.tokenizer={tiny_model}", "tokenize.shard_tokens=3000"],
    }[stage]
    args = [*stage_args, f"dataset.name=s3://{bucket}/in/a.jsonl", f"output.dir=s3://{bucket}/runs/r"]
    rng = random.Random(int(time.time()))
    for attempt in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "forge.cli", "run.progress=false", *args],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "FORGE_SCRATCH": str(tmp_path / f"machine{attempt}")},
        )
        time.sleep(rng.uniform(2.0, 6.0))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    last = forge_cli(args, tmp_path, env={"FORGE_SCRATCH": str(tmp_path / "last")})
    assert last.returncode == 0, last.stderr[-3000:]
    local_args = [*stage_args, f"dataset.name={planted / 'a.jsonl'}", f"output.dir={tmp_path / 'local'}"]
    local = forge_cli(local_args, tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]

    def ident(row: dict) -> str:  # tokenize's rows: id, source label, tokens
        return row["id"] if stage == "tokenize" else row["source"]["id"]

    got = sorted(ident(r) for r in remote_rows(fs, f"{bucket}/runs/r"))
    want = sorted(ident(r) for r in read_rows(tmp_path / "local"))
    once(got)
    assert got == want
    if stage == "tokenize":
        index = json.loads(fs.cat_file(f"{bucket}/runs/r/index.json"))
        local_index = json.loads((tmp_path / "local" / "index.json").read_text())
        [mine], [theirs] = index["sources"].values(), local_index["sources"].values()
        assert (mine["documents"], mine["tokens"]) == (theirs["documents"], theirs["tokens"])
    assert "state/run.lease" not in remote_files(fs, f"{bucket}/runs/r")
