"""The runner of batch stages (curate, and later dedup, tokenize, score): everything a stage
shares, written once. A stage only transforms a batch of rows; this module reads the input (a
mix of sources), shards it, writes each batch's outputs as chunk files, quarantines removed rows
with their stage and reason, counts, shows progress and resumes.

Resume is by batch: shard t reads its rows in batches of `output.examples_per_chunk`; batch k
becomes chunk k of every output (`data/TTTTT_KKKKK.parquet`, `rejected/...`, `pools/<name>/...`),
each written atomically, and only then `state/batch_TTTTT.json` records k+1 batches done. A kill
at any moment leaves whole chunks; the re-run removes chunks past the last recorded batch and
redoes that batch, so every input row ends in data/ or rejected/ exactly once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
import pyarrow as pa

from forge.config import ForgeConfig
from forge.io.mix import Mix, MixedRow
from forge.run.output import (
    clean_temp_files,
    read_columns,
    shard_files,
    unfinished_inputs,
    write_atomic,
    write_json_atomic,
)
from forge.run.progress import LiveProgress, task_progress_path

log = logging.getLogger("forge.run.batch")
ROW_CHARS = 10_000
BATCH_REJECT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # the row's id, or @file:line when it has none yet
        ("stage", pa.string()),  # the stage that removed it (curate, ...)
        ("filter", pa.string()),  # the step: input, normalize, or the filter's name
        ("reason", pa.string()),
        ("value", pa.string()),  # the value that failed, as JSON
        ("retryable", pa.bool_()),  # always false: the same row fails the same way
        ("source", pa.string()),  # the source's label
        ("where", pa.string()),  # file:line or split:row of the input row
        ("row", pa.string()),  # the input row as JSON, cut at 10,000 characters
    ]
)


@dataclass
class BatchResult:
    """What a stage makes of one batch: tables per output ("data", "pools/<name>"), removed rows
    (dicts with the keys of BATCH_REJECT_SCHEMA but stage and retryable) and counters."""

    outputs: dict[str, pa.Table] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)


class BatchStage(Protocol):
    name: str

    def fingerprint(self) -> dict[str, Any]:
        """The settings that must not change under a run dir that holds rows."""

    def restore(self, kept: pa.Table | None) -> None:
        """State carried across batches of a shard (e.g. ids seen), from the `id` column of the
        data chunks already written by earlier sessions."""

    def process(self, rows: list[MixedRow]) -> BatchResult:
        """Transform one batch."""


def add_counts(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Nested sum of counters (dicts of ints and dicts)."""
    for key, value in part.items():
        if isinstance(value, dict):
            add_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
    return total


def _json(value: Any) -> str:
    """JSON text of a row or value; a lone surrogate (json accepts `"\ud800"`, orjson does not)
    is kept escaped, so the row can still be audited."""
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(value, default=str, ensure_ascii=True)


def reject_row(row: MixedRow, label: str, step: str, reason: str, value: Any = None, rid: str | None = None) -> dict:
    """A removed input row, as rejected/ keeps it (the raw row, so it can be audited or fixed)."""
    raw = row.row.record
    text = _json(raw) if raw is not None else None
    return {
        "id": rid or f"@{row.row.where}" + (f".{row.copy}" if row.copy else ""),
        "filter": step,
        "reason": reason,
        "value": None if value is None else _json(value),
        "source": label,
        "where": row.row.where,
        "row": text[:ROW_CHARS] if text else None,
        "copy": row.copy,
    }


def _chunk_index(path: Path) -> int:
    return int(path.stem.split("_")[1])


def state_path(out_dir: Path, task: int) -> Path:
    return out_dir / "state" / f"batch_{task:05d}.json"


def read_state(out_dir: Path, task: int) -> dict[str, Any]:
    path = state_path(out_dir, task)
    if not path.exists():
        return {"batches": 0, "rows_in": 0, "counts": {}}
    return orjson.loads(path.read_bytes())


def output_dirs(out_dir: Path) -> list[Path]:
    """data/, rejected/ and every pool folder."""
    dirs = [out_dir / "data", out_dir / "rejected"]
    pools = out_dir / "pools"
    if pools.is_dir():
        dirs += sorted(p for p in pools.iterdir() if p.is_dir())
    return dirs


def drop_unrecorded(out_dir: Path, task: int, batches: int) -> int:
    """Chunks of a batch that a kill interrupted before it was recorded: removed, redone."""
    removed = 0
    for d in output_dirs(out_dir):
        clean_temp_files(d, f"{task:05d}_")
        for path in shard_files(d, task):
            if _chunk_index(path) >= batches:
                path.unlink()
                removed += 1
    return removed


def results_in_order(stage: BatchStage, batches: Iterator[tuple[int, list[MixedRow]]]) -> Iterator[tuple]:
    """(k, batch, result) in batch order. A stage with `submit(batch) -> wait()` (a GPU engine:
    score) gets batch k+1 before batch k's result is awaited, so reading and preparing the next
    batch overlaps the engine's work on this one; a kill still loses at most unrecorded batches."""
    if not hasattr(stage, "submit"):
        for k, batch in batches:
            yield k, batch, stage.process(batch)
        return
    pending = None
    for k, batch in batches:
        wait = stage.submit(batch)
        if pending is not None:
            yield pending[0], pending[1], pending[2]()
        pending = (k, batch, wait)
    if pending is not None:
        yield pending[0], pending[1], pending[2]()


def run_batch_task(cfg: ForgeConfig, task: int, stage: BatchStage, mix: Mix, total: int | None) -> dict[str, Any]:
    """Run shard `task` of a batch stage to the end (or resume it); returns its state."""
    out_dir = Path(cfg.output.dir)
    tasks = cfg.cluster.tasks
    size = cfg.output.examples_per_chunk
    state = read_state(out_dir, task)
    done_batches = state["batches"]
    if drop_unrecorded(out_dir, task, done_batches):
        log.info("task %d: removed the chunks of an unfinished batch %d; redoing it", task, done_batches)
    stage.restore(read_columns(shard_files(out_dir / "data", task), ["id"]))
    # a stage may add columns of its own to rejected/ (dedup: duplicate_of, jaccard)
    reject_schema = BATCH_REJECT_SCHEMA
    for extra in getattr(stage, "reject_fields", []):
        reject_schema = reject_schema.append(extra)
    label = f"task {task}" if tasks > 1 else "forge"
    share = None if total is None else len(range(task, total, tasks))  # rows g with g % tasks == task
    bar = LiveProgress(
        label, share or 0, state["rows_in"], cfg.run.progress, cfg.run.log_every_s, task_progress_path(out_dir, task)
    )
    bar.rows_per_s = True
    if state["rows_in"]:
        log.info("%s: resuming after %d batches (%d rows)", label, done_batches, state["rows_in"])
    status = "failed"
    t0 = time.monotonic()
    bar.start()
    try:
        # the rows of recorded batches are skipped, unread where the input allows (Parquet footers)
        todo = enumerate(batched(mix.rows(task, tasks, done=done_batches * size), size), start=done_batches)
        for k, batch, result in results_in_order(stage, todo):
            for name, table in result.outputs.items():
                if table.num_rows:
                    path = out_dir / name / f"{task:05d}_{k:05d}.parquet"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_atomic(path, table, getattr(stage, "dictionary_columns", True))
            # an up-sampled row's repeats (copy > 0) are counted, never listed again: rejected/
            # holds one entry per input row (a source whose rows all fail is not multiplied there)
            listed = [r for r in result.rejected if not r.get("copy")]
            if len(listed) < len(result.rejected):
                add_counts(result.counts, {"removed_copies_not_listed": len(result.rejected) - len(listed)})
            if listed:
                rows = [dict(r, stage=stage.name, retryable=False) for r in listed]
                (out_dir / "rejected").mkdir(exist_ok=True)
                write_atomic(
                    out_dir / "rejected" / f"{task:05d}_{k:05d}.parquet",
                    pa.Table.from_pylist(rows, schema=reject_schema),
                )
            state = {
                "batches": k + 1,
                "rows_in": state["rows_in"] + len(batch),
                "counts": add_counts(state["counts"], result.counts),
            }
            write_json_atomic(state_path(out_dir, task), state)
            bar.advance(docs=len(batch))
            if bar.total and bar.done > bar.total:
                bar.total = bar.done
            bar.poll()
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        bar.status = status
        if status == "complete":
            bar.total = bar.done
        bar.write_file()
        if bar.bar:
            bar._refresh()
            bar.bar.stop()
        log.info("%s", bar.line())
        stats_path = out_dir / "stats" / f"task_{task:05d}.json"
        try:
            sessions = orjson.loads(stats_path.read_bytes()).get("sessions", []) if stats_path.exists() else []
        except (OSError, orjson.JSONDecodeError):
            sessions = []
        session = {"status": status, "seconds": round(time.monotonic() - t0, 3), "rows": bar.done - bar.start_done}
        write_json_atomic(stats_path, {**state, "task": task, "sessions": [*sessions, session]})
    return state


def merge_batch_stats(out_dir: Path) -> dict[str, Any]:
    """stats.json of a batch stage so far (also after a failure): batch_totals, written."""
    merged = batch_totals(out_dir)
    write_json_atomic(out_dir / "stats.json", merged)
    return merged


def batch_totals(out_dir: Path) -> dict[str, Any]:
    """The per-shard counters summed (each counts only recorded batches, so a resumed run never
    counts twice)."""
    tasks = []
    for p in sorted((out_dir / "stats").glob("task_*.json")):
        try:
            tasks.append(orjson.loads(p.read_bytes()))
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning("%s is damaged (%s); skipped in stats.json", p, exc)
    counts: dict[str, Any] = {}
    for t in tasks:
        add_counts(counts, t.get("counts", {}))
    merged = {
        "rows_in": sum(t.get("rows_in", 0) for t in tasks),
        "tasks": len(tasks),
        "task_status": {str(t["task"]): (t.get("sessions") or [{}])[-1].get("status") for t in tasks},
        **counts,
    }
    merged["rows_written"] = merged.get("rows_kept", 0)
    if unfinished := unfinished_inputs(out_dir):
        merged["unfinished_inputs"] = unfinished
    return merged


def batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    """Lists of n items (the last one shorter)."""
    batch: list[Any] = []
    for x in items:
        batch.append(x)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch
