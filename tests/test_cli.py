"""The `forge` command itself: its --help, config mistakes as one `forge: error: <key>: ...` line
(plain commands and sweeps), where a multirun's points go, and the installed console script run
from an environment that is not activated (cron, Slurm scripts, pipx)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO, read_stats

from forge.cli import precheck, sweep_base_dir
from forge.config import register_configs
from forge.sweep.points import POINT_FILE

GROUPS = sorted(p.name for p in (REPO / "conf").iterdir() if p.is_dir() and any(p.glob("*.yaml")))


def test_help_is_forges_own() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "forge.cli", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.splitlines()[0].startswith("forge: ")
    assert "powered by hydra" not in out.lower() and "$APP_CONFIG_GROUPS" not in out
    for command in (
        "forge dataset.name=",
        "model=qwen3_4b",
        "forge --cfg job",
        "forge +sweep=NAME",
        "forge-status DIR",
        "forge-analyze DIR",
        "cluster=slurm",
        "README.md",
    ):
        assert command in out, command
    assert {"cluster", "dataset", "model", "prompt", "sweep"} <= set(GROUPS)
    listed = {line.split(":", 1)[0] for line in out.splitlines() if ": " in line and not line.startswith(" ")}
    assert set(GROUPS) <= listed, out  # Hydra's generated list: every conf/ group with its options
    assert "tiny_cpu" in out and "tiny_cpu_batch_tokens" in out


@pytest.mark.parametrize(
    "argv, line",
    [
        (["model.tp=["], "model.tp: cannot parse 'model.tp=[': no viable alternative at input '[' (write key=value)"),
        (["model.tp"], "model.tp: cannot parse 'model.tp': missing EQUAL at '<EOF>' (write key=value)"),
        (["=3"], "=3: an override needs a key (write key=value)"),
        (["model.tp=0"], "model.tp: must be > 0 (got 0)"),
        (["model.tp=1,2"], "model.tp: 'model.tp=1,2' sweeps over values: add --multirun to run each"),
        (["--multirun", "model.tpp=1,2"], "model.tpp: Key 'tpp' not in 'ModelConfig' (did you mean model.tp?)"),
        (["-m", "model.tp=1,abc"], "model.tp: Value 'abc' of type 'str' could not be converted to Integer"),
        (["-m", "model=tiny_cpu,nope"], "model=nope: no such model config; choose one of: "),
        (["+sweep=nope"], "sweep=nope: no such sweep config; choose one of: "),
        (["+sweep=tiny_cpu_batch_tokens", "model.tpp=3"], "model.tpp: Key 'tpp' not in 'ModelConfig'"),
    ],
)
def test_config_mistakes_are_one_line_naming_the_key(argv: list[str], line: str) -> None:
    """Malformed overrides, bad values, and a sweep's unknown key, value or config: found before
    Hydra runs anything (its own report is several lines), named by their key."""
    register_configs()
    error = precheck(argv)
    assert error is not None and error.startswith(line), error
    assert "\n" not in error and "hydra.cc" not in error


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "model.tp=0,-1"],  # each point is validated as it runs: one failed point, not a failed sweep
        ["+sweep=tiny_cpu_batch_tokens", "++hydra.sweep.dir=sw"],
        ["-m", "hydra.sweep.dir=sw", "output.dir=out", "model.tp=1,2"],
        ["--cfg", "job", "model.tpp=1"],  # Hydra's own flags: Hydra answers
    ],
)
def test_commands_hydra_accepts_pass_the_precheck(argv: list[str]) -> None:
    register_configs()
    assert precheck(argv) is None


def test_a_config_error_prints_forge_error_as_readme_says(tmp_path: Path) -> None:
    """The printed line is `forge: error: <key>: ...` (README's "A failure is one line"), for a plain
    command and a sweep, exit code 2, nothing else on stderr and nothing written."""

    def run(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "forge.cli", *args, f"output.dir={tmp_path / 'out'}"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        plain, sweep = pool.map(run, [["model.tp=0"], ["--multirun", "model.tpp=1,2"]])
    assert plain.returncode == 2 and plain.stderr.splitlines() == ["forge: error: model.tp: must be > 0 (got 0)"]
    assert sweep.returncode == 2 and sweep.stderr.splitlines() == [
        "forge: error: model.tpp: Key 'tpp' not in 'ModelConfig' (did you mean model.tp?)"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, expected, noted",
    [
        (["--multirun", "model.tp=1,2"], "out", False),
        (["--multirun", "model.tp=1,2", "hydra.sweep.dir=sw"], "sw", False),
        (["+sweep=tiny_cpu_batch_tokens", "++hydra.sweep.dir=sw"], "sw", False),
        (["-m", "hydra.sweep.dir=sw", "output.dir=out", "model.tp=1,2"], "out", True),
        (["-m", "hydra.sweep.dir=sw", "+output.dir=out", "model.tp=1,2"], "out", True),
        (["-m", "hydra.sweep.subdir=x", "model.tp=1,2"], "out", False),  # another hydra.sweep key
        (["-m", "hydra.sweep.dir.x=1", "my.output.dir=2"], "out", False),  # keys that only start alike
    ],
)
def test_sweep_base_dir(argv: list[str], expected: str, noted: bool) -> None:
    base, note = sweep_base_dir(argv, "out", "sw")
    assert base == expected
    if noted:
        assert note == "forge: hydra.sweep.dir=sw is ignored: output.dir=out names where the sweep points go"
    else:
        assert note is None


def _multirun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`forge --multirun ...` as typed (Hydra's flags come before the overrides)."""
    return subprocess.run(
        [sys.executable, "-m", "forge.cli", "--multirun", "run.progress=false", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _points(base: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(base.glob(f"*/{POINT_FILE}"))}


def test_multirun_points_go_under_hydra_sweep_dir(tmp_path: Path) -> None:
    """Two points that fail validation at once (no engine starts): each still gets its run dir,
    with its sweep_point.json, under hydra.sweep.dir; with output.dir also given, under output.dir."""
    grid = ["model.tp=0,-1"]
    proc = _multirun([*grid, f"hydra.sweep.dir={tmp_path / 'X'}"], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # both points failed
    points = _points(tmp_path / "X")
    assert sorted(points) == ["model.tp=-1", "model.tp=0"]
    assert all(p["status"] == "failed" and "model.tp: must be > 0" in p["failure"]["line"] for p in points.values())
    assert not (tmp_path / "outputs").exists()
    assert sorted(p.name for p in (tmp_path / "X").iterdir() if p.is_dir()) == sorted(points)  # no X/0, X/1
    assert "is ignored" not in proc.stderr

    proc = _multirun([*grid, f"hydra.sweep.dir={tmp_path / 'Z'}", f"output.dir={tmp_path / 'Y'}"], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert sorted(_points(tmp_path / "Y")) == ["model.tp=-1", "model.tp=0"]
    assert not _points(tmp_path / "Z")
    notes = [line for line in proc.stderr.splitlines() if "hydra.sweep.dir" in line]
    assert notes == [
        f"forge: hydra.sweep.dir={tmp_path / 'Z'} is ignored: output.dir={tmp_path / 'Y'} names where the sweep "
        "points go"
    ]

    proc = _multirun(grid, tmp_path)  # neither: output.dir's default, as before
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert sorted(_points(tmp_path / "outputs" / "tiny-qwen3__sample")) == ["model.tp=-1", "model.tp=0"]


@pytest.mark.slow
def test_console_script_runs_the_cpu_engine_without_an_activated_venv(tmp_path: Path, tiny_model: Path) -> None:
    """`.venv/bin/forge` from cron / a Slurm script / pipx: PATH has no venv bin/, yet the
    `transformers` console script beside forge's python is found and the engine starts."""
    forge = Path(sys.executable).parent / "forge"
    if not forge.exists():
        pytest.skip(f"no forge console script beside {sys.executable} (forge not pip-installed here)")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"
    out = tmp_path / "out"
    args = ["dataset.max_examples=2", "generation.max_tokens=4", "run.progress=false", f"output.dir={out}"]
    proc = subprocess.run([str(forge), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "is not installed" not in proc.stderr
    assert read_stats(out)["rows_written"] == 2
