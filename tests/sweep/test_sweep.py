"""Sweeps: every conf/sweep grid composes point by point; failures are classified from the point's
logs; a REAL sweep on the CPU engine with real failures (a start-up timeout, an engine that exits)
keeps going, lists them, skips settled points on a re-run and re-runs failed ones on request."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, forge_cli
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from forge.cli import conf_dir, sweep_point_dir, to_schema
from forge.config import register_configs
from forge.schema import ConfigError
from forge.sweep.points import POINT_FILE, FailureClass, classify, log_sizes, settled

register_configs()
SWEEPS = sorted(p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml"))


def _compose(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=conf_dir()):
        return compose(config_name="config", overrides=list(overrides))


def _grid(name: str) -> list[list[str]]:
    """The points Hydra's basic sweeper makes of the sweep file's params."""
    params = OmegaConf.load(REPO / "conf" / "sweep" / f"{name}.yaml").hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return [point for batch in BasicSweeper.split_arguments(parsed, None) for point in batch]


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_point_composes_with_its_values(name: str) -> None:
    points = _grid(name)
    assert len(points) >= 2
    dirs = set()
    for point in points:
        cfg = _compose(f"+sweep={name}", *point)
        typed = to_schema(cfg)
        for override in OverridesParser.create().parse_overrides(point):
            if override.key_or_group == "model":  # a group: the point runs that model file's model
                chosen = to_schema(_compose(f"model={override.value()}")).model.name_or_path
                assert typed.model.name_or_path == chosen, (name, point)
                continue
            got = OmegaConf.select(cfg, override.key_or_group)
            got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
            assert got == override.value(), (name, point)
        dirs.add(sweep_point_dir(typed.output.dir, point, {o.split("=")[0] for o in point}))
    assert len(dirs) == len(points), f"{name}: two points would share a run dir"


def test_speculative_sweeps_as_mappings_and_rejects_a_non_mapping() -> None:
    name = "qwen3_4b_speculative_h100"
    specs = [to_schema(_compose(f"+sweep={name}", *p)).model.speculative for p in _grid(name)]
    methods = sorted({s["method"] for s in specs if s})
    assert None in specs and methods == ["draft_model", "ngram", "suffix"]
    cfg = to_schema(_compose("model.speculative={method: ngram, num_speculative_tokens: 3}"))
    assert cfg.model.speculative == {"method": "ngram", "num_speculative_tokens": 3}
    with pytest.raises(ConfigError, match="model.speculative: must be a mapping"):
        to_schema(_compose("model.speculative=5"))


def test_retry_knob_coexists_with_the_sweep_group(tmp_path: Path) -> None:
    assert to_schema(_compose("+sweep=tiny_cpu_batch_tokens")).sweep.retry_failed is False
    assert to_schema(_compose("+sweep=tiny_cpu_batch_tokens", "sweep.retry_failed=true")).sweep.retry_failed
    assert to_schema(_compose("sweep.retry_failed=true", "+sweep=tiny_cpu_batch_tokens")).sweep.retry_failed
    proc = forge_cli(["sweep.retry_faild=true"], cwd=tmp_path)
    assert proc.returncode == 2 and "sweep.retry_faild" in proc.stderr


def _fake_point(tmp_path: Path, forge_log: str, engine_log: str = "") -> Path:
    """A point dir holding FAKE INJECTED logs: an OOM cannot be produced on CPU on demand."""
    point = tmp_path / "point"
    (point / "logs").mkdir(parents=True)
    (point / "forge.log").write_text(forge_log)
    (point / "logs" / "engine_task00000.log").write_text(engine_log)
    return point


def test_oom_classified_from_fake_injected_logs(tmp_path: Path) -> None:
    run = "2026-01-01 00:00:00,000 INFO forge: === forge run 2026-01-01 00:00:00 in x\n"
    error = "2026-01-01 00:01:00,000 ERROR forge: vllm engine exited with code 1 during start-up; last lines of:\n"
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)\n"
    point = _fake_point(tmp_path, run + error, "=== forge: starting vllm serve m\nloading\n" + oom)
    found = classify(point)
    assert found.cls == FailureClass.oom and "CUDA out of memory" in found.line
    assert found.log.endswith("engine_task00000.log")
    inproc = "ERROR forge: vLLM failed to start: ValueError: No available memory for the cache blocks. Try more\n"
    assert classify(_fake_point(tmp_path / "b", run + inproc)).cls == FailureClass.oom


def test_only_the_latest_attempt_is_classified(tmp_path: Path) -> None:
    """An old OOM in the logs must not name a later failure (fake injected logs)."""
    point = _fake_point(tmp_path, "ERROR forge: x\n", "CUDA out of memory\n")
    before = log_sizes(point)
    with open(point / "forge.log", "a") as fh:
        fh.write("2026-01-01 00:02:00,000 ERROR forge: vllm engine not ready after 900 s (model.startup_timeout_s)\n")
    found = classify(point, before)
    assert found.cls == FailureClass.startup_timeout and found.line.startswith("vllm engine not ready after 900 s")
    with open(point / "forge.log", "a") as fh:
        fh.write("ERROR forge: engine died (exit code -9) and model.max_restarts=3 restarts are used up; y\n")
    assert classify(point, log_sizes(point)).cls == FailureClass.other  # nothing new: no known cause
    assert classify(point, before).cls == FailureClass.startup_timeout  # first match in the new bytes


def test_settled_points(tmp_path: Path) -> None:
    cfg = to_schema(_compose("cluster.tasks=2"))
    point = tmp_path / "p"
    point.mkdir()
    assert settled(point, cfg) is None
    record = {"status": "failed", "failure": {"class": "oom", "line": "CUDA out of memory", "log": "x"}}
    (point / POINT_FILE).write_text(json.dumps(record))
    assert settled(point, cfg).failure.cls == FailureClass.oom
    cfg.sweep.retry_failed = True
    assert settled(point, cfg) is None
    cfg.sweep.retry_failed = False
    record["failure"]["class"] = "other"
    (point / POINT_FILE).write_text(json.dumps(record))
    assert settled(point, cfg) is None  # an unknown cause is always retried
    stats = {"tasks": 2, "last_sessions": [{"status": "complete"}, {"status": "failed"}]}
    (point / "stats.json").write_text(json.dumps(stats))
    assert settled(point, cfg) is None
    stats["last_sessions"][1]["status"] = "complete"
    (point / "stats.json").write_text(json.dumps(stats))
    assert settled(point, cfg).status == "finished"


def _snapshot(point: Path) -> dict[str, object]:
    """What a run of the point would change: sessions per task, log sizes, the outcome record."""
    sessions = {p.name: len(json.loads(p.read_text())["sessions"]) for p in sorted((point / "stats").glob("*.json"))}
    return {"sessions": sessions, "logs": log_sizes(point), "record": (point / POINT_FILE).read_text()}


@pytest.mark.slow
def test_real_sweep_failures_rerun_and_retry(tmp_path: Path, tiny_model: Path) -> None:
    """2 x 2 grid on the CPU engine: one point finishes (2 tasks), a bogus engine flag makes the
    engine exit (server_failure), a 0.01 s start-up limit times out twice (startup_timeout)."""
    base = tmp_path / "sweep"
    args = [
        "+sweep=tiny_cpu_batch_tokens",
        f"output.dir={base}",
        "dataset.max_examples=8",
        "cluster.tasks=2",
        "model.engine_args.cb-max-batch-tokens=64,oops",
        "model.startup_timeout_s=0.01,300",
    ]
    first = forge_cli(args, cwd=tmp_path)
    assert first.returncode == 1, first.stdout + first.stderr
    ok = base / "model.engine_args.cb-max-batch-tokens=64,model.startup_timeout_s=300"
    crashed = base / "model.engine_args.cb-max-batch-tokens=oops,model.startup_timeout_s=300"
    slow = sorted(base.glob("*,model.startup_timeout_s=0.01"))
    assert len(slow) == 2 and ok.is_dir() and crashed.is_dir()
    records = {p: json.loads((p / POINT_FILE).read_text()) for p in (ok, crashed, *slow)}
    assert records[ok]["status"] == "finished" and records[ok]["failure"] is None
    stats = json.loads((ok / "stats.json").read_text())
    assert stats["tasks"] == 2 and stats["rows_written"] == 8
    assert records[crashed]["failure"]["class"] == "server_failure"
    assert "exited with code 2 during start-up" in records[crashed]["failure"]["line"]
    assert "not a valid integer" in records[crashed]["failure"]["detail"]
    for p in slow:
        assert records[p]["failure"]["class"] == "startup_timeout"
        assert "(model.startup_timeout_s)" in records[p]["failure"]["line"]
    assert "sweep of 4 point(s): 3 failed, 1 finished" in first.stdout
    assert first.stdout.count("FAILED") == 3 and first.stdout.count(": startup_timeout") == 2
    assert f"FAILED {crashed}: server_failure" in first.stdout

    before = {p: _snapshot(p) for p in records}
    again = forge_cli(args, cwd=tmp_path)
    assert again.returncode == 1, again.stdout + again.stderr
    assert again.stderr.count("skipped, finished earlier") == 1
    assert again.stderr.count("skipped, failed earlier") == 3
    assert "engine pid" not in again.stderr  # no engine was started
    assert {p: _snapshot(p) for p in records} == before
    assert again.stdout.count("[skipped; sweep.retry_failed=true re-runs it]") == 3

    retry = forge_cli([*args, "sweep.retry_failed=true"], cwd=tmp_path)
    assert retry.returncode == 1, retry.stdout + retry.stderr
    assert retry.stderr.count("skipped, finished earlier") == 1 and retry.stderr.count("engine pid") == 3
    assert _snapshot(ok) == before[ok]
    for p in (crashed, *slow):
        after = json.loads((p / POINT_FILE).read_text())
        assert after["attempts"] == 2 and after["failure"]["class"] == records[p]["failure"]["class"]
        assert _snapshot(p)["sessions"] == {"task_00000.json": before[p]["sessions"]["task_00000.json"] + 1}

    analyzed = subprocess.run(
        [sys.executable, "-m", "forge.sweep.analyze", str(base)], capture_output=True, text=True, timeout=120
    )
    assert analyzed.returncode == 0, analyzed.stderr
    rows = {r["point"]: r for r in csv.DictReader(open(base / "sweep.csv"))}
    assert len(rows) == 4
    for p in (crashed, *slow):
        row = rows[p.name]
        assert row["status"] == "failed" and row["failure_class"] == records[p]["failure"]["class"]
        assert row["output_tok_s"] == "" and row["gpu_days_per_1b_output_tokens"] == ""
    row = rows[ok.name]
    per_task = [s["output_tokens_per_s"] for s in stats["last_sessions"]]
    assert row["tasks"] == "2" and row["gpus"] == "0" and row["devices"] == "2"  # a CPU task counts as 1
    assert float(row["output_tok_s"]) == pytest.approx(sum(per_task))
    assert float(row["output_tok_s_per_gpu"]) == pytest.approx(sum(per_task) / 2)
    assert row["best"] == "1"
    assert "failed: server_failure" in analyzed.stdout and "failed: startup_timeout" in analyzed.stdout


def _slurm_env() -> dict[str, str]:
    """The client settings of the test Slurm that .ci/slurm/up.sh starts."""
    path = Path(os.environ.get("FORGE_SLURM_DIR", "/var/lib/forge-slurm")) / "env"
    if not path.exists():
        pytest.fail(f"no test Slurm: {path} missing; start it with `sudo bash .ci/slurm/up.sh`")
    exports = [line.removeprefix("export ") for line in path.read_text().splitlines() if line.startswith("export ")]
    return {key: value.strip("'\"") for key, value in (e.split("=", 1) for e in exports)}


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_sweep_classifies_from_task_logs_and_skips_on_rerun(tmp_path: Path, tiny_model: Path) -> None:
    """On Slurm the failure is read from the array task's own logs; a re-run submits nothing."""
    env = _slurm_env()
    args = [
        "+sweep=tiny_cpu_batch_tokens",
        "cluster=slurm_ci",
        "cluster.wait=true",
        "dataset.max_examples=4",
        "model.engine_args.cb-max-batch-tokens=64,oops",
    ]
    first = forge_cli(args, cwd=tmp_path, env=env)
    assert first.returncode == 1, first.stdout + first.stderr
    base = tmp_path / "outputs" / "sweeps" / "tiny_cpu_batch_tokens"
    ok, bad = base / "model.engine_args.cb-max-batch-tokens=64", base / "model.engine_args.cb-max-batch-tokens=oops"
    assert json.loads((ok / POINT_FILE).read_text())["status"] == "finished"
    failure = json.loads((bad / POINT_FILE).read_text())["failure"]
    assert failure["class"] == "server_failure" and failure["log"].endswith("logs/forge_task00000.log")
    jobs = {p: (p / "slurm" / "jobs.json").read_text() for p in (ok, bad)}
    again = forge_cli(args, cwd=tmp_path, env=env)
    assert again.returncode == 1, again.stdout + again.stderr
    assert "skipped, finished earlier" in again.stderr and "skipped, failed earlier (server_failure)" in again.stderr
    assert {p: (p / "slurm" / "jobs.json").read_text() for p in (ok, bad)} == jobs  # nothing submitted


def test_a_sweep_refuses_to_publish_every_point_to_one_repo(tmp_path: Path) -> None:
    from forge.sweep.points import run_point

    cfg = to_schema(_compose("output.hub_repo=me/set", f"output.dir={tmp_path / 'p'}"))
    launched = []
    outcome = run_point(cfg, ["model.max_num_seqs=8"], lambda: launched.append(1) or 0)
    assert not launched and outcome.status == "failed" and "output.hub_repo" in outcome.failure.line
    # swept along with the grid, each point has its own repo: it runs
    outcome = run_point(cfg, ["output.hub_repo=me/set", "model.max_num_seqs=8"], lambda: launched.append(1) or 2)
    assert launched == [1]
