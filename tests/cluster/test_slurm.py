"""forge on a real Slurm (marker `slurm`): the single-node cluster that .ci/slurm/up.sh starts.

Each test submits with the real `forge` command, lets slurmctld/slurmd run the submitit jobs, and
judges by the rows on disk (each (id, rollout) exactly once), the jobs' states in sacct and what
`forge` / `forge-status` print. Most tasks talk to the session's shared CPU engine through
`model.engine=endpoint`; the throttled array runs the CPU engine itself in every task."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from conftest import endpoint_args, forge_cli, read_rows, read_stats, write_jsonl

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_env")]
UNSETTLED = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "UNKNOWN")


def _docs(tmp_path: Path, n: int, name: str = "d.jsonl") -> Path:
    return write_jsonl(tmp_path / name, [{"id": f"doc{i}", "prompt": f"write about topic {i}"} for i in range(n)])


def _slurm_args(data: Path, out: Path, tasks: int, *extra: str) -> list[str]:
    return [
        "cluster=slurm_ci",
        f"cluster.tasks={tasks}",
        f"dataset.name={data}",
        "dataset.id_column=id",
        f"output.dir={out}",
        "output.examples_per_chunk=5",
        "generation.max_tokens=16",
        *extra,
    ]


def _history(out: Path) -> list[dict]:
    return json.loads((out / "slurm" / "jobs.json").read_text())


def _sacct(*job_ids: str, fields: str = "JobID,State") -> dict[str, list[str]]:
    proc = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), "-o", fields], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.strip()]
    return {r[0]: r[1:] for r in rows}


def _requeues(job_id: str) -> int:
    """Runs of the job that ended REQUEUED (`sacct -D` keeps every run of a requeued job)."""
    proc = subprocess.run(
        ["sacct", "-D", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True, timeout=60
    )
    return sum(line.startswith("REQUEUED") for line in proc.stdout.splitlines())


def _state(job_id: str) -> str:
    proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, timeout=60)
    for line in proc.stdout.splitlines():
        jid, state = line.split("|")
        if jid == job_id:
            return state
    return _sacct(job_id).get(job_id, ["UNKNOWN"])[0].split()[0]


def _wait_ended(job_ids: list[str], timeout: float = 300) -> dict[str, str]:
    deadline = time.time() + timeout
    while True:
        states = {j: _state(j) for j in job_ids}
        if not any(s in UNSETTLED for s in states.values()):
            return states
        assert time.time() < deadline, f"jobs still running after {timeout} s: {states}"
        time.sleep(1)


def _wait_until(predicate, timeout: float = 180, what: str = "") -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _all_ids(sub: dict) -> list[str]:
    return [*sub["jobs"].values(), sub["monitor_id"], sub["finalize_id"]]


def _assert_exactly_once(out: Path, n_docs: int) -> None:
    pairs = Counter((r["id"], r["rollout"]) for r in read_rows(out))
    assert len(pairs) == n_docs, f"{n_docs - len(pairs)} rows lost"
    assert max(pairs.values()) == 1, f"duplicated: {[k for k, v in pairs.items() if v > 1][:5]}"


def _forge_status(out: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "forge.cluster.status", str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _shard_files(out: Path, shard: int) -> list[Path]:
    return sorted((out / "data").glob(f"{shard:05d}_*.parquet"))


def test_throttled_array_on_the_cpu_engine_then_finalize(tmp_path: Path, tiny_model: Path) -> None:
    n_docs = 12
    out = tmp_path / "run"
    args = _slurm_args(_docs(tmp_path, n_docs), out, 2, "cluster.workers=1", "cluster.mem_gb=3")
    t0 = time.time()
    proc = forge_cli(args, tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.time() - t0 < 60, "submission must not wait for the jobs"
    sub = _history(out)[-1]
    assert f"submitted array {sub['array_id']}" in proc.stdout and "forge-status" in proc.stdout
    assert str(out) in proc.stdout
    states = _wait_ended(_all_ids(sub), timeout=600)
    assert set(states.values()) == {"COMPLETED"}, states
    _assert_exactly_once(out, n_docs)
    assert read_stats(out)["documents_written"] == n_docs  # written by the finalize job
    assert (out / "slurm" / "finalized.json").exists()
    # %1: the two tasks never overlapped
    times = _sacct(*sub["jobs"].values(), fields="JobID,Start,End")
    spans = sorted((datetime.fromisoformat(s), datetime.fromisoformat(e)) for s, e in times.values())
    assert len(spans) == 2 and spans[0][1] <= spans[1][0], spans
    progress = json.loads((out / "progress.json").read_text())
    assert progress["done"] == progress["total"] == n_docs
    status = _forge_status(out)
    assert "2/2 shard(s) complete" in status
    # the same command again: nothing to submit
    again = forge_cli(args, tmp_path, timeout=120)
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout + again.stderr
    assert len(_history(out)) == 1


def test_failing_shard_is_reported_and_its_dependents_never_run(tmp_path: Path, cpu_server: dict) -> None:
    n_docs = 15
    out = tmp_path / "run"
    args = _slurm_args(_docs(tmp_path, n_docs), out, 3, *endpoint_args(cpu_server))
    (out / "data").mkdir(parents=True)
    (out / "data" / "00001_00000.parquet").write_bytes(b"PAR1 torn by a failing disk")  # a real unreadable file
    proc = forge_cli(args, tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    sub = _history(out)[-1]
    states = _wait_ended(_all_ids(sub), timeout=300)
    shard1 = sub["jobs"]["1"]
    assert states[shard1] == "FAILED", states
    assert states[sub["jobs"]["0"]] == states[sub["jobs"]["2"]] == "COMPLETED", states
    assert states[sub["finalize_id"]] == "CANCELLED", states  # afterok never satisfied
    assert _sacct(sub["finalize_id"], fields="JobID,Elapsed")[sub["finalize_id"]][0] == "00:00:00"
    assert not list((out / "slurm").glob(f"{sub['finalize_id']}/*_log.out")), "finalize must never start"
    assert states[sub["monitor_id"]] == "COMPLETED"
    assert not (out / "stats.json").exists()
    status = _forge_status(out)
    assert f"job {shard1}" in status and "FAILED" in status and "00001_00000.parquet" in status
    # the re-run says which shard failed, where its log is, and re-submits only that shard
    again = forge_cli(args, tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"shard 1 (job {shard1}) ended FAILED" in again.stdout
    assert "not a readable Parquet shard" in again.stdout and "log: " in again.stdout
    assert list(_history(out)[-1]["jobs"]) == ["1"]
    _wait_ended(_all_ids(_history(out)[-1]), timeout=300)
    # moving the damaged file aside, as the message says, completes the run
    (out / "data" / "00001_00000.parquet").rename(tmp_path / "damaged.parquet")
    done = forge_cli([*args, "cluster.wait=true"], tmp_path, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    _assert_exactly_once(out, n_docs)
    assert read_stats(out)["documents_written"] == n_docs


def test_requeued_and_preempted_tasks_resume_without_loss(tmp_path: Path, cpu_server: dict) -> None:
    n_docs = 120
    out = tmp_path / "run"
    args = _slurm_args(_docs(tmp_path, n_docs), out, 2, *endpoint_args(cpu_server), "run.max_in_flight=2")
    proc = forge_cli(args, tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    sub = _history(out)[-1]
    job0, job1 = sub["jobs"]["0"], sub["jobs"]["1"]
    _wait_until(lambda: len(_shard_files(out, 0)) >= 2 and len(_shard_files(out, 1)) >= 2, what="first chunks")
    # an admin requeue (as on node failure) and a preemption notice (USR2, what submitit checkpoints on)
    subprocess.run(["scontrol", "requeue", job0], check=True, timeout=60)
    subprocess.run(["scancel", "--signal=USR2", job1], check=True, timeout=60)
    states = _wait_ended(_all_ids(sub), timeout=600)
    assert set(states.values()) == {"COMPLETED"}, states
    _assert_exactly_once(out, n_docs)
    assert _requeues(job0) >= 1 and _requeues(job1) >= 1  # each really went back to the queue
    for shard in (0, 1):
        sessions = json.loads((out / "stats" / f"task_{shard:05d}.json").read_text())["sessions"]
        assert len(sessions) >= 2 and sessions[-1]["status"] == "complete", sessions
        # the resumed session sent only what the first one had not answered
        assert sum(s["requests_sent"] for s in sessions) <= n_docs // 2 + 2 * 2  # + in-flight at the stop
    assert read_stats(out)["documents_written"] == n_docs


def test_cancel_is_detected_and_the_rerun_resubmits_only_unfinished_shards(tmp_path: Path, cpu_server: dict) -> None:
    n_docs = 240  # enough that shard 1 is still running when it is cancelled (a fast CPU server finished 80)
    out = tmp_path / "run"
    args = _slurm_args(_docs(tmp_path, n_docs), out, 2, *endpoint_args(cpu_server), "run.max_in_flight=1")
    assert forge_cli(args, tmp_path, timeout=120).returncode == 0
    sub = _history(out)[-1]
    _wait_until(lambda: len(_shard_files(out, 1)) >= 1, what="a chunk of shard 1")
    # while it runs, the same command refuses to submit the run twice
    twice = forge_cli(args, tmp_path, timeout=120)
    assert twice.returncode == 1 and "already queued or running" in twice.stdout, twice.stdout
    subprocess.run(["scancel", sub["jobs"]["1"]], check=True, timeout=60)
    states = _wait_ended(_all_ids(sub), timeout=300)
    assert states[sub["jobs"]["1"]] == "CANCELLED" and states[sub["jobs"]["0"]] == "COMPLETED", states
    assert states[sub["finalize_id"]] == "CANCELLED"
    assert "CANCELLED" in _forge_status(out)
    again = forge_cli([*args, "cluster.wait=true"], tmp_path, timeout=400)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"shard 1 (job {sub['jobs']['1']}) ended CANCELLED" in again.stdout
    assert "1 shard(s), 1 already complete" in again.stdout
    assert list(_history(out)[-1]["jobs"]) == ["1"]
    _assert_exactly_once(out, n_docs)


def test_multirun_submits_every_point_without_blocking(tmp_path: Path, cpu_server: dict) -> None:
    data = _docs(tmp_path, 10)
    base = tmp_path / "sweep"
    args = [a for a in _slurm_args(data, base, 1, *endpoint_args(cpu_server)) if not a.startswith("output.dir")]
    t0 = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "forge.cli",
            "--multirun",
            "run.progress=false",
            f"output.dir={base}",
            *args,
            "run.max_in_flight=2,4",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.time() - t0 < 90
    points = sorted(p.parent.parent for p in base.glob("*/slurm/jobs.json"))
    assert [p.name for p in points] == ["run.max_in_flight=2", "run.max_in_flight=4"]
    assert proc.stdout.count("submitted array") == 2
    for point in points:
        sub = _history(point)[-1]
        assert set(_wait_ended(_all_ids(sub), timeout=300).values()) == {"COMPLETED"}
        _assert_exactly_once(point, 10)
        saved = yaml.safe_load((point / "config.yaml").read_text())
        assert f"run.max_in_flight={saved['run']['max_in_flight']}" == point.name


def test_hub_upload_from_the_monitor_and_finalize_jobs(tmp_path: Path, cpu_server: dict) -> None:
    """On Slurm the array tasks never publish; the monitor job commits finished chunks while they
    run and finalize commits the rest with the card. FakeHub is the Hub's TEST DOUBLE
    (tests/fake_hub.py); the jobs reach it through the exported HF_ENDPOINT."""
    from fake_hub import FakeHub

    token = "hf_" + os.urandom(17).hex()
    n_docs, repo = 30, "forge-tester/slurm-synth"
    out = tmp_path / "run"
    with FakeHub({token: "write"}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
        env["HF_HOME"] = str(tmp_path / "hf_home")
        args = _slurm_args(_docs(tmp_path, n_docs), out, 2, *endpoint_args(cpu_server), "run.max_in_flight=2")
        args += [
            f"output.hub_repo={repo}",
            "output.hub_commits_per_hour=3600",
            "cluster.monitor_interval_s=1",
            "cluster.wait=true",
        ]
        proc = forge_cli(args, tmp_path, timeout=400, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        files = hub.files(repo)
        local = {f"data/{p.name}": p.read_bytes() for p in (out / "data").glob("*.parquet")}
        assert {k: v for k, v in files.items() if k.startswith("data/")} == local
        added = Counter(p for c in hub.commits for p in c["added"] if p.endswith(".parquet"))
        assert set(added.values()) == {1}
        times = [c["time"] for c in hub.commits]
        assert all(b - a >= 0.95 for a, b in zip(times, times[1:], strict=False)), times
        card = files["README.md"].decode()
        assert "## Statistics" in card and f'load_dataset("{repo}"' in card
        _assert_exactly_once(out, n_docs)
        for path in out.rglob("*"):
            if path.is_file():
                assert token.encode() not in path.read_bytes(), f"token in {path}"


def test_curate_runs_as_an_array_then_finalizes(tmp_path: Path) -> None:
    """A batch stage on Slurm: each shard is an array task, finalize writes stats.json and the card."""
    rows = [
        {"id": f"c{i}", "messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}]}
        for i in range(60)
    ]
    rows[5] = {"id": "c5", "messages": [{"role": "user", "content": "no answer"}]}
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    out = tmp_path / "cur"
    args = [
        "pipeline=curate",
        "cluster=slurm_ci",
        "cluster.tasks=2",
        "cluster.wait=true",
        f"dataset.name={data}",
        f"output.dir={out}",
        "output.examples_per_chunk=10",
    ]
    proc = forge_cli(args, tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    kept, rejected = read_rows(out), read_rows(out, "rejected")
    assert sorted(r["source"]["id"] for r in kept) == sorted(f"c{i}" for i in range(60) if i != 5)
    assert [r["filter"] for r in rejected] == ["chat_structure"]
    stats = read_stats(out)
    assert stats["rows_in"] == 60 and stats["tasks"] == 2 and stats["rows_kept"] == 59
    assert (out / "slurm" / "finalized.json").exists() and "chat_structure" in (out / "README.md").read_text()
    # each task held its shard's lock, finalize the run's; released, and the dir is a finished input
    from forge.run.locks import running_holder

    assert {p.name for p in (out / "state").glob("*.lock")} >= {"task_00000.lock", "task_00001.lock", "run.lock"}
    assert running_holder(out) is None and (out / "state" / "finished.json").exists()


def test_dedup_runs_each_step_as_an_array_chained_afterok(tmp_path: Path) -> None:
    """signatures (3 tasks) -> buckets -> clusters -> the filter array -> finalize, on Slurm;
    the same rows out as a local run."""
    from forge.stages.dedup.planted import removed_in_run, write

    data = tmp_path / "planted"
    write(data, 300, seed=7)
    sources = f"dataset.sources=[{{name:{data / 'a.jsonl'},label:a}},{{name:{data / 'b.jsonl'},label:b}}]"
    common = ["pipeline=dedup", sources, "cluster.tasks=3", "dedup.signature_rows=40"]
    local = forge_cli([*common, f"output.dir={tmp_path / 'local'}"], tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    out = tmp_path / "slurm"
    proc = forge_cli([*common, "cluster=slurm_ci", "cluster.wait=true", f"output.dir={out}"], tmp_path, timeout=500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for step in ("signatures", "buckets", "clusters"):
        assert f"submitted step {step}" in proc.stdout, proc.stdout
    assert sorted(r["source"]["id"] for r in read_rows(out)) == sorted(
        r["source"]["id"] for r in read_rows(tmp_path / "local")
    )
    assert removed_in_run(out) == removed_in_run(tmp_path / "local") and removed_in_run(out)
    assert (out / "logs" / "forge_signatures00002.log").exists() and (out / "logs" / "forge_clusters00000.log").exists()
    stats = read_stats(out)
    assert stats["rows_in"] == 300 and stats["dedup"]["clusters"] > 0
    assert (out / "slurm" / "finalized.json").exists() and "## Deduplication" in (out / "README.md").read_text()
    again = forge_cli([*common, "cluster=slurm_ci", f"output.dir={out}"], tmp_path)
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout + again.stderr[-2000:]


def test_tokenize_array_then_finalize_writes_every_shard_once(tmp_path: Path, tiny_model: Path) -> None:
    """Two array tasks tokenize their input shards; finalize builds tokens/ and index.json."""
    texts = [f"the water of the river number {i} " * (1 + i % 7) for i in range(120)]
    data = write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    out = tmp_path / "tok"
    args = [
        "pipeline=tokenize",
        "cluster=slurm_ci",
        "cluster.tasks=2",
        "cluster.wait=true",
        f"dataset.name={data}",
        f"tokenize.tokenizer={tiny_model}",
        "tokenize.shard_tokens=500",
        "output.examples_per_chunk=20",
        f"output.dir={out}",
    ]
    proc = forge_cli(args, tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    index = json.loads((out / "index.json").read_text())
    [source] = index["sources"].values()
    prefixes = [s["prefix"] for s in source["shards"]]
    assert len(prefixes) == len(set(prefixes)) > 1 and source["documents"] == 120
    assert all((out / (p + ".bin")).exists() and (out / (p + ".mask.idx")).exists() for p in prefixes)
    rows = read_rows(out)
    assert len(rows) == len({r["id"] for r in rows}) == 120
    assert read_stats(out)["tokenize"]["documents"] == 120


def test_score_array_then_finalize_resolves_quantiles_over_every_shard(tmp_path: Path, tiny_model: Path) -> None:
    """Two array tasks score their shards on the CPU engine; finalize computes the quantile over
    both shards and writes the pool, as a local run does."""
    rng = random.Random(5)
    words = "the water of the river runs to the sea and light comes from a star".split()
    rows = [
        {
            "id": f"c{i}",
            "messages": [
                {"role": "user", "content": " ".join(rng.choice(words) for _ in range(5))},
                {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(3 + i % 9))},
            ],
        }
        for i in range(80)
    ]
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    common = ["pipeline=score", "model=tiny_cpu", f"dataset.name={data}", "cluster.tasks=2"]
    common += ["output.examples_per_chunk=15", "+score.pools.low=nll_mean <= quantile(0.25)"]
    local = forge_cli([*common, f"output.dir={tmp_path / 'local'}"], tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    out = tmp_path / "slurm"
    proc = forge_cli([*common, "cluster=slurm_ci", "cluster.wait=true", f"output.dir={out}"], tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = {r["source"]["id"]: r["nll_sum"] for r in read_rows(out)}
    want = {r["source"]["id"]: r["nll_sum"] for r in read_rows(tmp_path / "local")}
    assert got.keys() == want.keys() and len(got) == 80
    assert all(abs(got[k] - want[k]) < 1e-6 for k in got)
    low = {r["id"] for r in read_rows(out / "pools", "low")}
    assert low == {r["id"] for r in read_rows(tmp_path / "local" / "pools", "low")} and 15 <= len(low) <= 25
    assert read_stats(out)["score"]["scored_tokens"] == read_stats(tmp_path / "local")["score"]["scored_tokens"]


def test_semantic_dedup_steps_run_as_arrays(tmp_path: Path) -> None:
    """dedup.method=semantic on Slurm: embeddings (2 tasks) -> kmeans -> assign -> pairs ->
    clusters -> the filter array -> finalize; the same removals as a local run."""
    from forge.stages.dedup.paraphrases import plant_paraphrases

    rows, _ = plant_paraphrases(10, 60, seed=2)
    data = write_jsonl(tmp_path / "docs.jsonl", rows)
    common = [
        "pipeline=dedup",
        "dedup.method=semantic",
        f"dataset.name={data}",
        "cluster.tasks=2",
        "dedup.signature_rows=30",
        "dedup.semantic.cluster_rows=40",
    ]
    local = forge_cli([*common, f"output.dir={tmp_path / 'local'}"], tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    out = tmp_path / "slurm"
    proc = forge_cli([*common, "cluster=slurm_ci", "cluster.wait=true", f"output.dir={out}"], tmp_path, timeout=500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for step in ("embeddings", "kmeans", "assign", "pairs", "clusters"):
        assert f"submitted step {step}" in proc.stdout, proc.stdout
    removed = sorted((r["id"], r["duplicate_of"]) for r in read_rows(out, "rejected"))
    assert removed and removed == sorted(
        (r["id"], r["duplicate_of"]) for r in read_rows(tmp_path / "local", "rejected")
    )
    assert read_stats(out)["dedup"]["method"] == "semantic"
