"""`forge-analyze RUNS_DIR`: the figures of a sweep, one row per point, and the best setting per model.

Reads each point dir under RUNS_DIR (config.yaml, stats.json, command.json, sweep_point.json) and
writes sweep.csv, sweep.md, one PNG per figure and, per model, a conf/model YAML holding the best
point's `model:` section. Throughput is what stats.json measured from the first request to the last
answer (start-up excluded; it has its own column), summed over a point's tasks; per-GPU figures
divide by the GPUs the tasks held (tp * pp * dp each), and a CPU-engine task counts as 1 device so
CPU sweeps get figures too. Failed points keep their row, with the failure class and no figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from forge.config import slug
from forge.sweep.points import POINT_FILE, is_finished, recorded_failure

NOT_SETTINGS = {"output.dir", "run.progress", "sweep", "sweep.retry_failed"}  # overrides that label no point
FIGURES = {  # column -> (plot title, file)
    "output_tok_s_per_gpu": ("output tok/s per GPU", "output_tok_s_per_gpu.png"),
    "input_tok_s_per_gpu": ("input tok/s per GPU", "input_tok_s_per_gpu.png"),
    "gpu_days_per_1b_output_tokens": ("GPU-days per 1B output tokens", "gpu_days_per_1b_output_tokens.png"),
    "gpus_for_1b_output_tokens_per_hour": ("GPUs for 1B output tokens/hour", "gpus_for_1b_output_tokens_per_hour.png"),
    "startup_s": ("engine start-up s (slowest task)", "startup_s.png"),
}
BEST = "output_tok_s_per_gpu"
COLUMNS = [  # what figures() returns, in CSV order
    "tasks", "gpus", "devices", "output_tok_s", "input_tok_s", "output_tok_s_per_gpu", "input_tok_s_per_gpu",
    "gpu_days_per_1b_output_tokens", "gpus_for_1b_output_tokens_per_hour", "startup_s", "generation_s", "tokens_out",
]  # fmt: skip


class AnalyzeError(ValueError):
    """RUNS_DIR holds nothing to analyze, or a point's file cannot be read; names the file."""


@dataclass
class Point:
    """One sweep point: where it is, its settings, how it ended and, if it finished, its figures."""

    dir: Path
    config: dict[str, Any]
    overrides: list[str]
    status: str
    failure_class: str = ""
    failure_line: str = ""
    label: str = ""
    swept: dict[str, str] = field(default_factory=dict)
    figures: dict[str, float | int | None] = field(default_factory=dict)
    best: bool = False

    @property
    def model(self) -> str:
        return str(self.config.get("model", {}).get("name_or_path", "?"))


def _load(path: Path, kind: str) -> Any:
    try:
        text = path.read_text()
        return json.loads(text) if kind == "json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise AnalyzeError(f"{path}: cannot read ({exc})") from exc


def find_points(runs: Path) -> list[Path]:
    """Every run dir under runs (config.yaml or sweep_point.json in it), `.stale` results excluded."""
    marks = [*runs.rglob("config.yaml"), *runs.rglob(POINT_FILE)]  # a point with a config error has no config.yaml
    return sorted({p.parent for p in marks if ".stale" not in p.relative_to(runs).parts})


def measured_sessions(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task, its last session that measured throughput (a later no-op re-run measures nothing)."""
    by_task: dict[Any, dict[str, Any]] = {}
    for s in stats.get("sessions") or []:
        if s.get("output_tokens_per_s") is not None and "task" in s:
            by_task[s["task"]] = s
    return [by_task[t] for t in sorted(by_task)] if by_task else list(stats.get("last_sessions") or [])


def figures(stats: dict[str, Any]) -> dict[str, float | int | None]:
    """Throughput summed over tasks, per GPU (a CPU task = 1 device), and what 1B output tokens cost."""
    sessions = measured_sessions(stats)
    out_tps = sum(s.get("output_tokens_per_s") or 0.0 for s in sessions)
    in_tps = sum(s.get("input_tokens_per_s") or 0.0 for s in sessions)
    gpus = sum(int(s.get("gpus") or 0) for s in sessions)
    devices = sum(max(int(s.get("gpus") or 0), 1) for s in sessions)
    per_dev = out_tps / devices if devices else 0.0
    startups = [s["engine_startup_s"] for s in sessions if s.get("engine_startup_s") is not None]
    windows = [s["generation_s"] for s in sessions if s.get("generation_s") is not None]
    return {
        "tasks": len(sessions),
        "gpus": gpus,
        "devices": devices,
        "output_tok_s": out_tps,
        "input_tok_s": in_tps,
        "output_tok_s_per_gpu": per_dev,
        "input_tok_s_per_gpu": in_tps / devices if devices else 0.0,
        "gpu_days_per_1b_output_tokens": 1e9 / per_dev / 86400 if per_dev else None,
        "gpus_for_1b_output_tokens_per_hour": 1e9 / 3600 / per_dev if per_dev else None,
        "startup_s": max(startups) if startups else None,
        "generation_s": max(windows) if windows else None,
        "tokens_out": int(stats.get("tokens_out") or 0),
    }


def load_point(point: Path) -> Point:
    config = (_load(point / "config.yaml", "yaml") if (point / "config.yaml").exists() else None) or {}
    command = point / "command.json"
    overrides = list(_load(command, "json").get("overrides") or []) if command.exists() else []
    tasks = int(config.get("cluster", {}).get("tasks") or 1)
    if is_finished(point, tasks):
        return Point(point, config, overrides, "finished", figures=figures(_load(point / "stats.json", "json")))
    failure = recorded_failure(point)
    if failure:
        return Point(point, config, overrides, "failed", failure.cls.value, failure.line)
    record = _load(point / POINT_FILE, "json") if (point / POINT_FILE).exists() else {}
    return Point(point, config, overrides, str(record.get("status") or "unfinished"))


def _setting(override: str) -> tuple[str, str] | None:
    key, sep, value = override.partition("=")
    key = key.lstrip("+~")
    if not sep or key in NOT_SETTINGS or key.startswith("hydra."):
        return None
    return key, value


def label_points(points: list[Point]) -> None:
    """Label each point by the values that differ between points (the swept ones)."""
    settings = [dict(s for s in map(_setting, p.overrides) if s) for p in points]
    keys = sorted({k for s in settings for k in s})
    swept = [k for k in keys if len({s.get(k) for s in settings}) > 1]
    for p, s in zip(points, settings, strict=True):
        p.swept = {k: s.get(k, "") for k in swept}
        p.label = ", ".join(f"{k}={v}" for k, v in p.swept.items()) or p.dir.name


def _order(value: str) -> tuple[int, float, str]:
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def sort_points(points: list[Point]) -> list[Point]:
    """By swept values, numbers as numbers (max_num_seqs 64 before 512)."""
    return sorted(points, key=lambda p: [_order(v) for v in p.swept.values()] + [(2, 0.0, p.dir.name)])


def pick_best(points: list[Point]) -> dict[str, Point]:
    """Per model, the finished point with the highest output tok/s per GPU."""
    best: dict[str, Point] = {}
    for p in points:
        value = p.figures.get(BEST) if p.status == "finished" else None
        if value and (p.model not in best or value > best[p.model].figures[BEST]):
            best[p.model] = p
    for p in best.values():
        p.best = True
    return best


def sweep_name(points: list[Point], runs: Path) -> str:
    for p in points:
        for o in p.overrides:
            if o.startswith("+sweep="):
                return o.split("=", 1)[1]
    return runs.resolve().name


def _columns(points: list[Point]) -> list[str]:
    swept = sorted({k for p in points for k in p.swept})
    return ["point", "label", "model", "status", "failure_class", "failure_line", *swept, *COLUMNS, "best"]


def write_csv(points: list[Point], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_columns(points))
        writer.writeheader()
        for p in points:
            row = {"point": p.dir.name, "label": p.label, "model": p.model, "status": p.status}
            row |= {"failure_class": p.failure_class, "failure_line": p.failure_line, **p.swept, **p.figures}
            writer.writerow({**row, "best": int(p.best)})


def _num(x: float | int | None) -> str:
    if x is None:
        return "—"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def markdown(points: list[Point], name: str) -> str:
    lines = [
        f"## Sweep {name}: {len(points)} point(s), {sum(p.status == 'finished' for p in points)} finished",
        "",
        "tok/s from the first request to the last answer (start-up excluded), summed over a point's tasks; per GPU = "
        "over the GPUs the tasks held (tp x pp x dp each); **a CPU-engine task counts as 1 device**. "
        "GPU-days per 1B output tokens = 1e9 / (output tok/s per GPU) / 86400; GPUs for 1B output "
        "tokens/hour = 1e9 / 3600 / (output tok/s per GPU). Start-up: the slowest task's. * = best per model.",
        "",
        "| point | model | status | out tok/s/GPU | in tok/s/GPU | GPU-days/1B out | GPUs for 1B out/h | start-up s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        f = p.figures
        status = p.status if not p.failure_class else f"failed: {p.failure_class}"
        cells = [f"{p.label}{' *' if p.best else ''}", p.model, status]
        cells += [_num(f.get(k)) for k in FIGURES]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    failed = [p for p in points if p.failure_class]
    if failed:
        lines += ["", "Failures:", ""] + [f"- {p.label}: {p.failure_class}: `{p.failure_line}`" for p in failed]
    return "\n".join(lines) + "\n"


def model_file_name(p: Point, sweep: str) -> str:
    """`<model>_<sweep>_best`: the `model=` choice of the point, else the model's slug."""
    choice = next((o.split("=", 1)[1] for o in p.overrides if o.lstrip("+").startswith("model=")), None)
    stem = (choice or slug(p.model)).lower().replace("-", "_")
    name = sweep if sweep.startswith(stem) else f"{stem}_{sweep}"
    return "".join(ch if ch.isalnum() or ch in "._" else "_" for ch in f"{name}_best")


def model_yaml(p: Point, sweep: str, runs: Path, n_candidates: int) -> str:
    """The best point's `model:` section (unset knobs left out), headed by where it came from."""
    model = {k: v for k, v in (p.config.get("model") or {}).items() if v is not None and v != {}}
    engine = (measured_sessions(_load(p.dir / "stats.json", "json")) or [{}])[-1].get("engine_version") or "?"
    per_gpu = p.figures[BEST]
    header = [
        f"# Best setting for {p.model}, chosen by forge-analyze on {time.strftime('%Y-%m-%d')} from sweep {sweep}",
        f"# ({runs.resolve()}),",
        f"# point `{p.label}`: {per_gpu:,.1f} output tok/s per GPU (a CPU task counts as 1), the highest of",
        f"# {n_candidates} finished point(s) of this model; figure: {FIGURES[BEST][1]}, table: sweep.md.",
        f"# Measured on cluster `{p.config.get('cluster', {}).get('name', '?')}` with {engine}.",
        f"# Copy into conf/model/ and run: forge model={model_file_name(p, sweep)}",
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(model, sort_keys=False)


def analyze(runs: Path, out: Path) -> tuple[list[Point], list[Path]]:
    """Write every output file into out; returns the points and the files written."""
    paths = find_points(runs)
    if not paths:
        raise AnalyzeError(f"{runs}: no run dirs (a dir holding config.yaml or {POINT_FILE}) under it")
    points = [load_point(p) for p in paths]
    label_points(points)
    points = sort_points(points)
    best = pick_best(points)
    name = sweep_name(points, runs)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "sweep.csv", out / "sweep.md"]
    write_csv(points, written[0])
    written[1].write_text(markdown(points, name))
    from forge.sweep.plots import plot_figures

    written += plot_figures(points, out, FIGURES)
    for model, p in best.items():
        path = out / "conf_model" / f"{model_file_name(p, name)}.yaml"
        path.parent.mkdir(exist_ok=True)
        n = sum(q.model == model and q.status == "finished" for q in points)
        path.write_text(model_yaml(p, name, runs, n))
        written.append(path)
    return points, written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="forge-analyze", description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", type=Path, help="a sweep's output.dir (its points are the dirs below it)")
    parser.add_argument("--out", type=Path, help="where to write the files (default: RUNS_DIR)")
    args = parser.parse_args(argv)
    try:
        points, written = analyze(args.runs_dir, args.out or args.runs_dir)
    except AnalyzeError as exc:
        print(f"forge-analyze: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(markdown(points, sweep_name(points, args.runs_dir)))
    print("forge-analyze: wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
