"""The run of a batch stage: a mix of sources in, the stage's transformation, chunked output.

run_forge (forge/run/runner.py) drives any stage through the same four calls: prepare (read-only
checks; a refused command writes nothing), start, run_task per shard, finish (stats.json and
the card). The registry (forge/stages/registry.py) names each stage's object: generation's own
(forge/stages/generate/run.py: it owns an engine and a request cache), or BatchRun here around a
batch stage's transformation, which forge/run/batch.py applies batch by batch.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from forge.config import ForgeConfig
from forge.io.dataset import DatasetError
from forge.io.mix import CHARS_PER_TOKEN, Mix, MixedRow, aim_at_kept_rows, expected_rows, input_fingerprint, open_mix
from forge.run.batch import batch_totals, merge_batch_stats, run_batch_task
from forge.run.locks import shard_lock, step_lock
from forge.run.output import (
    RunChanged,
    check_manifest,
    mark_finished,
    mark_started,
    record_manifest,
    start_fresh,
    write_json_atomic,
)
from forge.stages.registry import hook, load, spec

log = logging.getLogger("forge.stages")

PROBE_ROWS = 200


def pilot_pass_rates(stage: Any, mix: Mix, rows: int) -> dict[int, tuple[float, float]]:
    """The share of each source's first `rows` rows that the stage keeps, and the tokens
    (characters / 4) of a kept row (deterministic: the same rows every time). The stage's state
    is reset by the task's restore() afterwards."""
    rates = {}
    for s in mix.sources:
        batch = []
        for n, row in enumerate(s.reader.rows()):
            if n >= rows or (s.spec.max_rows is not None and n >= s.spec.max_rows):
                break
            batch.append(MixedRow(n, s.index, row))
        if batch:
            counts = stage.process(batch).counts
            kept = counts.get("rows_kept", len(batch))
            chars = (counts.get("by_source") or {}).get(s.label, {}).get("chars_kept", 0)
            rates[s.index] = (kept / len(batch), chars / kept / CHARS_PER_TOKEN if kept else 0.0)
    stage.restore(None)
    log.info(
        "mix: share of rows kept, from each source's first rows: %s",
        ", ".join(f"{mix.sources[i].label} {r[0]:.0%}" for i, r in rates.items()),
    )
    return rates


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def term_as_interrupt() -> None:
    """SIGTERM (Slurm's scancel, a supervisor) stops a batch stage like Ctrl-C, from the moment
    its run is prepared: the batch being worked on is dropped, the task's stats are written, the
    exit code is 130, and the re-run redoes only that batch. (Generation's event loop has its own.)"""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def probe_columns(s: Any) -> None:
    """Read a local source's first rows: an unreadable file, or a column its field map names
    that none of those rows has, stops the run here, naming the source and the column."""
    seen: set[str] = set()
    try:
        for n, row in enumerate(s.reader.rows()):
            if row.record is not None:
                seen.update(map(str, row.record))
            if n >= PROBE_ROWS:
                break
    except DatasetError as exc:
        raise DatasetError(f"{s.key} ({s.label}): {exc}") from None
    if not seen:
        return
    wanted = [(f"columns.{role}", col) for role, col in s.spec.columns.items()]
    for kind, m in (s.spec.meta or {}).items():
        if isinstance(m, dict) and m.get("column"):
            wanted.append((f"meta.{kind}.column", m["column"]))
    for key, column in wanted:
        if column not in seen:
            raise DatasetError(
                f"{s.key}.{key} ({s.label}): no row of {s.spec.name} has the column {column!r}; "
                f"its columns: {', '.join(sorted(seen))}"
            )


class BatchRun:
    """A batch stage's run: a mix of sources in, the stage's transformation, chunked output."""

    def __init__(self, cfg: ForgeConfig, make_stage: Any) -> None:
        self.cfg = cfg
        self.make_stage = make_stage
        self.mix: Mix | None = None
        self.stage: Any = None
        self.wanted: dict[str, Any] = {}
        self.total: int | None = None
        self.workflow: Any = None

    def prepare(self) -> None:
        """Open the sources (each local one's first row is read: an unreadable file or a source
        that is not there stops here), build the stage (bad filters, pools and field maps stop
        here) and check the run dir was made with the same settings. Writes nothing."""
        term_as_interrupt()
        cfg = self.cfg
        self.mix = open_mix(cfg.dataset)
        for s in self.mix.sources:
            if s.reader.files:
                probe_columns(s)
        self.stage = self.make_stage(cfg, self.mix)
        if self.mix.targeted and cfg.dataset.pilot_rows > 0 and getattr(self.stage, "pilot", True):
            rates = pilot_pass_rates(self.stage, self.mix, cfg.dataset.pilot_rows)
            aim_at_kept_rows(self.mix, rates, cfg.dataset.max_repeat)
        pass_rates = {s.label: round(s.pass_rate, 4) for s in self.mix.sources}
        capped = {s.label: s.capped for s in self.mix.sources if s.capped is not None}
        self.wanted = {
            "version": 1,
            "stage": self.stage.name,
            "dataset": {
                **self.mix.describe(),
                "files": input_fingerprint(self.mix),
                "pass_rate": pass_rates,
                **({"short_of_share": capped} if capped else {}),
            },
            "sharding": {"tasks": cfg.cluster.tasks, "examples_per_chunk": cfg.output.examples_per_chunk},
            "settings": self.stage.fingerprint(),
        }
        workflow = spec(cfg.pipeline.stage).workflow
        if workflow:
            self.workflow = load(workflow)(cfg, self.mix, self.stage, self.wanted)
        try:
            check_manifest(Path(cfg.output.dir), self.wanted)
            if self.workflow:
                self.workflow.check()
        except RunChanged as exc:
            start_fresh(cfg, self.wanted, "previous results", exc)

    def start(self) -> None:
        self.total = expected_rows(self.mix) if self.mix else None
        if self.workflow:
            self.workflow.total = self.total
            record_manifest(Path(self.cfg.output.dir), self.wanted)
            if self.cfg.cluster.task_index is None:
                self.workflow.run_all()  # a local run: every step, then the filter per task
            else:
                self.workflow.require_done()  # a Slurm filter task: the step arrays ran before it

    def pre_steps(self) -> list[tuple[str, list[int]]]:
        """The steps before the per-shard tasks, each with its unfinished tasks (Slurm chains
        one array per step)."""
        if not self.workflow:
            return []
        return [(s, [t for t in range(n) if not self.workflow.done(s, t)]) for s, n in self.workflow.steps()]

    def run_step(self, step: str, task: int) -> None:
        with step_lock(Path(self.cfg.output.dir), step, task):
            mark_started(Path(self.cfg.output.dir))
            record_manifest(Path(self.cfg.output.dir), self.wanted)
            self.workflow.total = expected_rows(self.mix) if step == "signatures" else None
            self.workflow.run(step, task)

    def run_task(self, task: int) -> None:
        with shard_lock(Path(self.cfg.output.dir), task):
            record_manifest(Path(self.cfg.output.dir), self.wanted)
            state = run_batch_task(self.cfg, task, self.stage, self.mix, self.total)
        c = state.get("counts", {})
        log.info(
            "task %d: %d rows in, %d kept, %d removed",
            task,
            state["rows_in"],
            c.get("rows_kept", 0),
            c.get("rows_removed", 0),
        )

    def close(self) -> None:
        if hasattr(self.stage, "close"):
            self.stage.close()

    def partial_stats(self) -> None:
        merge_batch_stats(Path(self.cfg.output.dir))

    @staticmethod
    def finish_dir(out_dir: Path, hub_repo: str | None) -> dict[str, Any]:
        """stats.json and the card once every shard is done (also Slurm's finalize job)."""
        return finish_batch(out_dir, hub_repo)[0]

    def finish(self, hub_repo: str | None) -> tuple[dict[str, Any], str]:
        out_dir = Path(self.cfg.output.dir)
        stats, card = finish_batch(out_dir, hub_repo)
        pools = stats.get("pools") or {}
        pool_text = f"; pools: {', '.join(f'{k} {v}' for k, v in pools.items())}" if pools else ""
        line = (
            f"forge: {stats.get('rows_kept', 0)} rows kept of {stats['rows_in']} in {out_dir / 'data'}; "
            f"{stats.get('rows_removed', 0)} removed, each with its reason, in {out_dir / 'rejected'}{pool_text}; "
            f"stats: {out_dir / 'stats.json'}; card: {card}"
        )
        return stats, line


def finish_batch(out_dir: Path, hub_repo: str | None) -> tuple[dict[str, Any], Path]:
    """stats.json (with the mix's requested vs achieved shares) and the card of a batch stage."""
    from forge.run.card import write_card

    manifest = json.loads((out_dir / "forge_run.json").read_text()) if (out_dir / "forge_run.json").exists() else {}
    requested = (manifest.get("dataset") or {}).get("requested_share") or {}
    pass_rate = (manifest.get("dataset") or {}).get("pass_rate") or {}
    by_tokens = (manifest.get("dataset") or {}).get("target_tokens") is not None  # shares of tokens
    stats = batch_totals(out_dir)
    finish = hook((manifest.get("settings") or {}).get("stage"), "finish")
    if finish is not None:
        finish(out_dir, stats)
    by_source = stats.get("by_source") or {}
    kept_key = "chars_kept" if by_tokens else "rows_kept"
    kept_all = sum(v.get(kept_key, 0) for v in by_source.values()) or 1
    read_all = sum(v.get("rows_in", 0) for v in by_source.values()) or 1
    short = (manifest.get("dataset") or {}).get("short_of_share") or {}
    stats["mix"] = {
        label: {
            "requested_share": requested.get(label),
            "sampled_share": round(by_source.get(label, {}).get("rows_in", 0) / read_all, 6),
            "achieved_share": round(by_source.get(label, {}).get(kept_key, 0) / kept_all, 6),
            "pilot_pass_rate": pass_rate.get(label),
        }
        | ({"short_of_share": True} if label in short else {})
        for label in (requested or by_source)
    }
    write_json_atomic(out_dir / "stats.json", stats)
    card = write_card(out_dir, hub_repo)  # a batch stage's card: forge/run/stage_card.py
    mark_finished(out_dir, stats)  # now a whole input for the next stage
    return stats, card
