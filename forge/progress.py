"""Live progress: a rich bar (documents done / total, tokens/s, ETA) on a terminal, and a plain
line in the log every run.log_every_s seconds (what Slurm logs and CI show)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger("forge.progress")
console = Console(stderr=True)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LiveProgress:
    def __init__(self, label: str, total: int, done: int, enabled: bool, log_every_s: float) -> None:
        self.label = label
        self.total = total
        self.done = done
        self.start_done = done
        self.tokens_out = 0
        self.t0 = time.monotonic()
        self.log_every_s = log_every_s
        self.bar: Progress | None = None
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

    def __exit__(self, *exc: object) -> None:
        if self._ticker:
            self._ticker.cancel()
        if self.bar:
            self._refresh()
            self.bar.stop()
        log.info("%s", self.line())

    def tokens_per_s(self) -> float:
        return self.tokens_out / max(time.monotonic() - self.t0, 1e-9)

    def eta_s(self) -> float | None:
        rate = (self.done - self.start_done) / max(time.monotonic() - self.t0, 1e-9)
        return (self.total - self.done) / rate if rate > 0 else None

    def line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.label}: {self.done}/{self.total} docs ({pct:.1f}%), "
            f"{self.tokens_per_s():,.0f} tok/s out, ETA {_eta(self.eta_s())}"
        )

    def advance(self, docs: int = 0, tokens_out: int = 0) -> None:
        self.done += docs
        self.tokens_out += tokens_out

    def _refresh(self) -> None:
        if self.bar:
            self.bar.update(self._task, completed=self.done, tps=f"{self.tokens_per_s():,.0f}")

    async def _tick(self) -> None:
        last_log = time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            self._refresh()
            if time.monotonic() - last_log >= self.log_every_s:
                last_log = time.monotonic()
                log.info("%s", self.line())
