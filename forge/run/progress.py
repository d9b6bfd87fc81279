"""Live progress: a rich bar (documents done / total, tokens/s, ETA) on a terminal, a plain line in
the log every run.log_every_s seconds (what Slurm logs and CI show), and progress/task_NNNNN.json,
which the monitor (or `forge-status`) sums into the run's progress.json."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from forge.run.output import OutputError, write_json_atomic

log = logging.getLogger("forge.run.progress")
console = Console(stderr=True)
FILE_EVERY_S = 5.0


def task_progress_path(out_dir: Path, task: int) -> Path:
    return out_dir / "progress" / f"task_{task:05d}.json"


def aggregate_progress(out_dir: Path, states: dict[int, str] | None = None) -> dict[str, Any]:
    """Sum the per-task files into <run dir>/progress.json (states: Slurm state per shard, if known)."""
    tasks = []
    for path in sorted((out_dir / "progress").glob("task_*.json")):
        try:
            tasks.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # being replaced right now; the next refresh reads it
    done = sum(t["done"] for t in tasks)
    total = sum(t["total"] for t in tasks)
    running = [t for t in tasks if t.get("status") == "running"]
    rate = sum(t["docs_per_s"] for t in running)
    summary: dict[str, Any] = {
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "done": done,
        "total": total,
        "percent": round(100.0 * done / total, 2) if total else None,
        "output_tokens_per_s": sum(t["output_tokens_per_s"] for t in running),
        "eta_s": (total - done) / rate if rate > 0 else None,
        "tasks_reporting": len(tasks),
        # spent by the sessions running now (finished sessions' spend is in stats/)
        "running_cost_usd": sum(t.get("cost_usd") or 0.0 for t in running),
        "tasks": {str(t["task"]): {k: t.get(k) for k in ("done", "total", "status")} for t in tasks},
    }
    if states:
        for task, state in states.items():
            summary["tasks"].setdefault(str(task), {})["slurm_state"] = state
    write_json_atomic(out_dir / "progress.json", summary)
    return summary


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LiveProgress:
    def __init__(
        self, label: str, total: int, done: int, enabled: bool, log_every_s: float, path: Path | None = None
    ) -> None:
        self.label = label
        self.path = path
        self.task = int(path.stem.split("_")[-1]) if path else 0
        self.status = "running"
        self.total = total
        self.done = done
        self.start_done = done
        self.tokens_out = 0
        self.cost_usd: float | None = None  # spent in this session, when the model has prices
        self.t0 = time.monotonic()
        self.log_every_s = log_every_s
        self.bar: Progress | None = None
        self.rows_per_s = False  # set by stages without an engine
        if enabled and sys.stderr.isatty():
            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("docs · {task.fields[tps]} tok/s ·"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._task = self.bar.add_task(label, total=total, completed=done, tps="0")
        self._ticker: asyncio.Task | None = None

    def __enter__(self) -> LiveProgress:
        if self.bar:
            self.bar.start()
        self._ticker = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._ticker:
            self._ticker.cancel()
        self.status = "complete" if exc_type is None else "stopped"
        self.write_file()
        if self.bar:
            self._refresh()
            self.bar.stop()
        log.info("%s", self.line())

    def restart_clock(self) -> None:
        """Rates and ETA count from here (generation starts after the engine is up)."""
        self.t0 = time.monotonic()
        self.start_done = self.done
        self.tokens_out = 0

    def tokens_per_s(self) -> float:
        return self.tokens_out / max(time.monotonic() - self.t0, 1e-9)

    def eta_s(self) -> float | None:
        rate = (self.done - self.start_done) / max(time.monotonic() - self.t0, 1e-9)
        return (self.total - self.done) / rate if rate > 0 else None

    def line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        rate = (self.done - self.start_done) / max(time.monotonic() - self.t0, 1e-9)
        if not self.total and self.done:  # an input not counted ahead (a remote JSON file, the Hub)
            unit = "rows" if self.rows_per_s else "docs"
            return f"{self.label}: {self.done} {unit} so far, {rate:,.0f} {unit}/s (total not known ahead: no ETA)"
        if self.rows_per_s:  # a stage without an engine: its rate is rows, not tokens
            eta = _eta(self.eta_s())
            return f"{self.label}: {self.done}/{self.total} rows ({pct:.1f}%), {rate:,.0f} rows/s, ETA {eta}"
        spent = f", ${self.cost_usd:,.4f} spent" if self.cost_usd is not None else ""
        return (
            f"{self.label}: {self.done}/{self.total} docs ({pct:.1f}%), "
            f"{self.tokens_per_s():,.0f} tok/s out{spent}, ETA {_eta(self.eta_s())}"
        )

    def advance(self, docs: int = 0, tokens_out: int = 0) -> None:
        self.done += docs
        self.tokens_out += tokens_out

    def spend(self, usd: float) -> None:
        self.cost_usd = (self.cost_usd or 0.0) + usd

    def write_file(self) -> None:
        if self.path is None:
            return
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        data = {
            "task": self.task,
            "status": self.status,
            "done": self.done,
            "total": self.total,
            "docs_per_s": (self.done - self.start_done) / elapsed,
            "output_tokens_per_s": self.tokens_out / elapsed,
            "eta_s": self.eta_s(),
            "cost_usd": self.cost_usd,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:
            write_json_atomic(self.path, data)
        except (OSError, OutputError) as exc:  # progress is advisory; never stop the work for it
            log.debug("progress file not written: %s", exc)

    def finish(self, status: str) -> None:
        self.status = status
        self.write_file()

    def start(self) -> None:
        """For a synchronous stage loop: start the bar; then call poll() after each batch."""
        if self.bar:
            self.bar.start()
        self._last_log = self._last_file = time.monotonic()
        self.write_file()

    def poll(self) -> None:
        """What the async ticker does, for a synchronous loop: the bar, the file, the log line."""
        self._refresh()
        now = time.monotonic()
        if now - self._last_file >= FILE_EVERY_S:
            self._last_file = now
            self.write_file()
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            log.info("%s", self.line())

    def _refresh(self) -> None:
        if self.bar:
            self.bar.update(self._task, completed=self.done, tps=f"{self.tokens_per_s():,.0f}")

    async def _tick(self) -> None:
        last_log = last_file = time.monotonic()
        self.write_file()
        while True:
            await asyncio.sleep(0.5)
            self._refresh()
            if time.monotonic() - last_file >= FILE_EVERY_S:
                last_file = time.monotonic()
                await asyncio.to_thread(self.write_file)
            if time.monotonic() - last_log >= self.log_every_s:
                last_log = time.monotonic()
                log.info("%s", self.line())
