"""forge-analyze: the README's CPU sweep end to end (real engine, real stats) into CSV, markdown,
PNGs and a conf/model file that composes; the per-GPU arithmetic for GPU points."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, forge_cli
from hydra import compose, initialize_config_dir

from forge.cli import to_schema
from forge.config import register_configs
from forge.sweep.analyze import figures, measured_sessions

register_configs()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _session(task: int, out_tps: float | None, in_tps: float | None, gpus: int, startup: float) -> dict:
    return {
        "task": task,
        "status": "complete",
        "output_tokens_per_s": out_tps,
        "input_tokens_per_s": in_tps,
        "gpus": gpus,
        "engine_startup_s": startup,
        "generation_s": 10.0,
    }


def test_gpu_figures_sum_tasks_and_divide_by_their_gpus() -> None:
    """Two tasks of tp=2: 1,000 + 3,000 tok/s over 4 GPUs = 1,000 per GPU; a later no-op session
    of task 1 (a re-run after it finished, nothing measured) does not replace its figure."""
    stats = {
        "tokens_out": 123,
        "sessions": [
            _session(0, 1000.0, 4000.0, 2, 60.0),
            _session(1, 3000.0, 8000.0, 2, 90.0),
            _session(1, None, None, 2, 0.0),
        ],
    }
    assert [s["output_tokens_per_s"] for s in measured_sessions(stats)] == [1000.0, 3000.0]
    f = figures(stats)
    assert (f["tasks"], f["gpus"], f["devices"]) == (2, 4, 4)
    assert f["output_tok_s"] == 4000.0 and f["output_tok_s_per_gpu"] == 1000.0
    assert f["input_tok_s_per_gpu"] == 3000.0
    assert f["gpu_days_per_1b_output_tokens"] == pytest.approx(11.574, abs=1e-3)  # 1e6 s / 86,400
    assert f["gpus_for_1b_output_tokens_per_hour"] == pytest.approx(277.78, abs=1e-2)  # 1e9 / 3,600 / 1,000
    assert f["startup_s"] == 90.0


@pytest.mark.slow
def test_readme_cpu_sweep_end_to_end(tmp_path: Path, tiny_model: Path) -> None:
    """`forge +sweep=tiny_cpu_batch_tokens && forge-analyze outputs/sweeps/tiny_cpu_batch_tokens`."""
    proc = forge_cli(["+sweep=tiny_cpu_batch_tokens"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = tmp_path / "outputs" / "sweeps" / "tiny_cpu_batch_tokens"
    analyzed = subprocess.run(
        [sys.executable, "-m", "forge.sweep.analyze", str(runs)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert analyzed.returncode == 0, analyzed.stderr
    points = sorted(p for p in runs.iterdir() if (p / "config.yaml").exists())
    assert [p.name for p in points] == [
        "model.engine_args.cb-max-batch-tokens=512",
        "model.engine_args.cb-max-batch-tokens=64",
    ]
    rows = {r["point"]: r for r in csv.DictReader(open(runs / "sweep.csv"))}
    assert sorted(rows) == [p.name for p in points]
    for p in points:
        row, stats = rows[p.name], json.loads((p / "stats.json").read_text())
        (last,) = stats["last_sessions"]
        assert row["status"] == "finished" and row["failure_class"] == ""
        assert row["label"] == p.name and row["model.engine_args.cb-max-batch-tokens"] == p.name.split("=")[1]
        out_tps = float(row["output_tok_s"])
        assert out_tps > 0 and float(row["input_tok_s"]) > 0 and float(row["startup_s"]) > 0
        assert out_tps == pytest.approx(last["output_tokens_per_s"])
        assert float(row["input_tok_s"]) == pytest.approx(last["input_tokens_per_s"])
        assert float(row["startup_s"]) == pytest.approx(last["engine_startup_s"])
        assert row["gpus"] == "0" and row["devices"] == "1"  # CPU engine: 1 device
        assert float(row["output_tok_s_per_gpu"]) == pytest.approx(out_tps)
        assert float(row["gpu_days_per_1b_output_tokens"]) == pytest.approx(1e9 / out_tps / 86400)
        assert float(row["gpus_for_1b_output_tokens_per_hour"]) == pytest.approx(1e9 / 3600 / out_tps)
    best = max(rows.values(), key=lambda r: float(r["output_tok_s_per_gpu"]))
    assert [r["best"] for r in rows.values()].count("1") == 1 and best["best"] == "1"

    table = (runs / "sweep.md").read_text()
    assert table in analyzed.stdout and "a CPU-engine task counts as 1 device" in table
    assert f"| {best['label']} * |" in table
    pngs = sorted(runs.glob("*.png"))
    assert len(pngs) == 5 and all(p.read_bytes().startswith(PNG_MAGIC) and p.stat().st_size > 5000 for p in pngs)
    assert str(runs / "sweep.csv") in analyzed.stdout

    (model_file,) = (runs / "conf_model").glob("*.yaml")
    text = model_file.read_text()
    assert text.startswith("# Best setting for forge://tiny-qwen3") and "sweep tiny_cpu_batch_tokens" in text
    assert f"point `{best['label']}`" in text and "output_tok_s_per_gpu.png" in text
    chosen = yaml.safe_load((runs / best["point"] / "config.yaml").read_text())["model"]
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    shutil.copy(model_file, conf / "model")
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        cfg = to_schema(compose(config_name="config", overrides=[f"model={model_file.stem}"]))
    assert cfg.model.engine_args == chosen["engine_args"] and cfg.model.name_or_path == chosen["name_or_path"]
    assert cfg.model.max_model_len == chosen["max_model_len"] and cfg.model.engine.value == chosen["engine"]
