"""Every stage with its input and its run dir on a real S3-compatible server (moto_server), through
the real CLI: the same rows as on local disk, resume from a fresh machine (another scratch dir),
a second writer refused, and no credential in any object or stream."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import chat_rows as chats
from conftest import forge_cli, read_rows
from faults.checks import error_line
from object_store import assert_no_secret_in_bucket, once, put_jsonl, put_parquet, remote_files, remote_rows

pytestmark = pytest.mark.slow


def _curate(src: str, out: str, *extra: str) -> list[str]:
    return ["pipeline=curate", f"dataset.name={src}", f"output.dir={out}", "output.examples_per_chunk=40", *extra]


def test_curate_reads_and_writes_the_store_and_matches_a_local_run(s3, tmp_path: Path) -> None:
    fs = s3.fs()
    bucket = s3.bucket("cur")
    rows = chats(300)
    rows[5] = {"id": "bad", "messages": [{"role": "user", "content": "no answer"}]}
    put_parquet(fs, f"{bucket}/in/part-0.parquet", rows[:150])
    put_jsonl(fs, f"{bucket}/in/part-1.jsonl", rows[150:])
    remote = forge_cli(_curate(f"s3://{bucket}/in/", f"s3://{bucket}/runs/c1"), tmp_path)
    assert remote.returncode == 0, remote.stderr[-3000:]
    local_in = tmp_path / "in"
    local_in.mkdir()
    fs.get(f"{bucket}/in/", str(local_in), recursive=True)
    local = forge_cli(_curate(str(local_in), str(tmp_path / "local")), tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    got = remote_rows(fs, f"{bucket}/runs/c1")
    want = read_rows(tmp_path / "local")
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in want) and len(got) == 299
    rejected = remote_rows(fs, f"{bucket}/runs/c1", "rejected")
    assert len(rejected) == 1 and "no answer" in rejected[0]["row"] and "part-0.parquet" in rejected[0]["where"]
    files = remote_files(fs, f"{bucket}/runs/c1")
    assert "state/finished.json" in files and "README.md" in files and "stats.json" in files
    assert not [f for f in files if f.endswith((".lock", ".lease")) or ".tmp-" in f], files
    stats = json.loads(fs.cat_file(f"{bucket}/runs/c1/stats.json"))
    assert stats["rows_in"] == 300 and stats["rows_kept"] == 299
    assert_no_secret_in_bucket(fs, bucket, remote.stdout, remote.stderr)
    # a re-run is settled: nothing redone, nothing uploaded twice
    again = forge_cli(_curate(f"s3://{bucket}/in/", f"s3://{bucket}/runs/c1"), tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    once([r["id"] for r in remote_rows(fs, f"{bucket}/runs/c1")])
    assert len(remote_rows(fs, f"{bucket}/runs/c1")) == 299


def test_a_remote_run_dir_is_the_next_stages_input(s3, tmp_path: Path) -> None:
    fs = s3.fs()
    bucket = s3.bucket("next")
    put_parquet(fs, f"{bucket}/in/a.parquet", chats(120))
    first = forge_cli(_curate(f"s3://{bucket}/in/a.parquet", f"s3://{bucket}/runs/one"), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = forge_cli(_curate(f"s3://{bucket}/runs/one", f"s3://{bucket}/runs/two"), tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(remote_rows(fs, f"{bucket}/runs/two")) == 120
    # an unfinished remote run dir is refused as input, naming it
    fs.rm(f"{bucket}/runs/one/state/finished.json")
    third = forge_cli(_curate(f"s3://{bucket}/runs/one", f"s3://{bucket}/runs/three"), tmp_path)
    assert third.returncode == 2
    assert "is not finished" in error_line(third.stderr) and f"s3://{bucket}/runs/one" in third.stderr
    assert not fs.exists(f"{bucket}/runs/three")


def test_bad_urls_and_credentials_are_one_line_and_write_nothing(s3, tmp_path: Path) -> None:
    fs = s3.fs()
    bucket = s3.bucket("bad")
    put_parquet(fs, f"{bucket}/in/a.parquet", chats(10))
    cases = [
        (_curate(f"s3://{bucket}/nothing-here/", f"s3://{bucket}/runs/x"), {}, "no such bucket, object or prefix"),
        (_curate(f"s3://no-such-bucket-{bucket}/in/", f"{tmp_path}/out"), {}, "no such bucket"),
        (_curate(f"s3://{bucket}/in/", f"s3://no-such-bucket-{bucket}/run"), {}, "no such bucket"),
        (
            _curate(f"s3://{bucket}/in/", f"s3://{bucket}/runs/y"),
            {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""},
            "credentials",
        ),
    ]
    for args, env, words in cases:
        proc = forge_cli(args, tmp_path, env={**env, "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")})
        assert proc.returncode in (1, 2), proc.stderr[-2000:]
        line = error_line(proc.stderr)
        assert words in line.lower() or words in line, line
        assert "s3://" in line, line
    assert remote_files(fs, bucket) == ["in/a.parquet"]
    assert not (tmp_path / "out").exists()


def test_a_second_writer_is_refused_on_any_machine(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from forge.storage.config import StorageConfig
    from forge.storage.fs import configure
    from forge.storage.lease import Lease

    fs = s3.fs()
    bucket = s3.bucket("lock")
    put_parquet(fs, f"{bucket}/in/a.parquet", chats(10))
    configure(StorageConfig())
    held = Lease(f"s3://{bucket}/runs/r", "run", "busy: {holder}")
    held.acquire()  # this test process: alive, so the lease is live
    try:
        proc = forge_cli(_curate(f"s3://{bucket}/in/", f"s3://{bucket}/runs/r"), tmp_path)
        assert proc.returncode == 1
        assert f"pid {os.getpid()}" in error_line(proc.stderr) and "being run right now" in proc.stderr
    finally:
        held.release()
    assert remote_files(fs, f"{bucket}/runs/r") == []
    # a lease left by a process that is gone (kill -9) is taken over at once on its own machine
    fs.pipe(
        f"{bucket}/runs/r/state/run.lease",
        json.dumps({"pid": 2**22 + 7, "host": os.uname().nodename, "boot": _boot(), "renewed_at": 0}).encode(),
    )
    proc = forge_cli(_curate(f"s3://{bucket}/in/", f"s3://{bucket}/runs/r"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "taking it over" in proc.stderr


def _boot() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def test_dedup_tokenize_and_score_on_the_store_match_local_runs(s3, tiny_model: Path, tmp_path: Path) -> None:
    """Each batch stage's whole run dir (dedup's steps, tokenize's shards and index, score's
    columns) goes to the store; tokenize reads dedup's remote run dir, score remote chats."""
    from forge.stages.dedup.planted import write

    fs = s3.fs()
    bucket = s3.bucket("stages")
    planted = tmp_path / "planted"
    planted.mkdir()
    write(planted, 300, seed=5)
    fs.put(str(planted / "a.jsonl"), f"{bucket}/in/a.jsonl")
    put_jsonl(fs, f"{bucket}/in/chats.jsonl", chats(12))
    steps = {
        "dedup": (["pipeline=dedup", "dedup.minhash.threshold=0.7"], "in/a.jsonl"),
        "tok": (["pipeline=tokenize", f"tokenize.tokenizer={tiny_model}", "tokenize.shard_tokens=4000"], "runs/dedup"),
        "score": (["pipeline=score", "model=tiny_cpu"], "in/chats.jsonl"),
    }
    for name, (args, src) in steps.items():
        remote = forge_cli(
            [*args, f"dataset.name=s3://{bucket}/{src}", f"output.dir=s3://{bucket}/runs/{name}"], tmp_path
        )
        assert remote.returncode == 0, f"{name}: {remote.stderr[-3000:]}"
        local_src = tmp_path / "local" / src
        if not local_src.exists():
            fs.get(f"{bucket}/{src}", str(local_src), recursive=True)
        local = forge_cli(
            [*args, f"dataset.name={local_src}", f"output.dir={tmp_path / 'local' / 'runs' / name}"], tmp_path
        )
        assert local.returncode == 0, f"{name}: {local.stderr[-3000:]}"
        here = tmp_path / "local" / "runs" / name
        mine = sorted(str(p.relative_to(here)) for p in here.rglob("*") if p.is_file())
        theirs = remote_files(fs, f"{bucket}/runs/{name}")
        kept = [f for f in mine if not f.endswith((".lock", ".log")) and "/." not in f and not f.startswith(".")]
        kept = [f for f in kept if not f.startswith("tokens/")]  # a shard dir is named by the input's label
        assert set(kept) <= set(theirs), (name, sorted(set(kept) - set(theirs)))
        assert len(remote_rows(fs, f"{bucket}/runs/{name}")) == len(read_rows(here)), name
    index = json.loads(fs.cat_file(f"{bucket}/runs/tok/index.json"))
    local_index = json.loads((tmp_path / "local/runs/tok/index.json").read_text())
    [remote_source], [local_source] = index["sources"].values(), local_index["sources"].values()
    assert remote_source["documents"] == local_source["documents"] and remote_source["tokens"] == local_source["tokens"]
    for mine, theirs in zip(remote_source["shards"], local_source["shards"], strict=True):
        local_bin = (tmp_path / "local/runs/tok" / f"{theirs['prefix']}.bin").read_bytes()
        assert fs.cat_file(f"{bucket}/runs/tok/{mine['prefix']}.bin") == local_bin
    # forge.data reads a remote tokenize run once forge-pull has brought it down
    from forge.data import TokenShards

    pulled = subprocess.run(
        ["forge-pull", f"s3://{bucket}/runs/tok", str(tmp_path / "tok")], capture_output=True, text=True
    )
    assert pulled.returncode == 0 and "file(s)" in pulled.stdout, pulled.stderr
    ds = TokenShards(tmp_path / "tok", 32)
    assert len(ds) > 0 and ds[0]["input_ids"].shape == (32,)
    again = subprocess.run(
        ["forge-pull", f"s3://{bucket}/runs/tok", str(tmp_path / "tok")], capture_output=True, text=True
    )
    assert again.returncode == 0 and again.stdout.startswith("forge-pull: 0 file(s)"), again.stdout
    status = subprocess.run(["forge-status", f"s3://{bucket}/runs/tok"], capture_output=True, text=True)
    assert (
        status.returncode == 0 and "nobody writes it now" in status.stdout and "1/1 shard(s) complete" in status.stdout
    )
    scores = sorted(round(r["nll_mean"], 4) for r in remote_rows(fs, f"{bucket}/runs/score"))
    assert scores and scores == sorted(round(r["nll_mean"], 4) for r in read_rows(tmp_path / "local/runs/score"))
    assert_no_secret_in_bucket(fs, bucket)
