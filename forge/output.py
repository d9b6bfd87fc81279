"""The run directory: Parquet shards written atomically, what is already done, and the run's
fingerprint. Config: conf/config.yaml `output:`.

A shard is `data/TTTTT_CCCCC.parquet` (task, chunk), written to a temp file, fsynced and
renamed, so a kill leaves whole shards or none. What is done is read back from the shards by
(id, rollout) — never from input order — so a re-run skips exactly those.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
DATA_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("rollout", pa.int32()),
        ("messages", pa.list_(MESSAGE)),
        ("text", pa.string()),
        ("reasoning", pa.string()),
        ("finish_reason", pa.string()),
        ("length_stopped", pa.bool_()),
        ("truncated", pa.bool_()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("model", pa.string()),
        ("revision", pa.string()),
        ("engine", pa.string()),
        ("metadata", pa.string()),
    ]
)
REJECT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # the row's id, or @file:line when it has no usable id
        ("rollout", pa.int32()),  # -1: the whole row (all rollouts)
        ("stage", pa.string()),  # input | prompt | request
        ("reason", pa.string()),
        ("retryable", pa.bool_()),
        ("source", pa.string()),
        ("prompt", pa.string()),  # the raw value as JSON, cut at 10,000 characters
    ]
)
_SHARD = re.compile(r"^(\d{5})_(\d{5})\.parquet$")


class RunChanged(RuntimeError):
    """The output dir holds a run with other input, sharding or generation settings."""


class OutputError(RuntimeError):
    """A file in the run dir that forge cannot read; the message names it and what to do."""


def shard_files(directory: Path, task: int | None = None) -> list[Path]:
    if not directory.is_dir():
        return []
    out = []
    for p in sorted(directory.iterdir()):
        m = _SHARD.match(p.name)
        if m and (task is None or int(m.group(1)) == task):
            out.append(p)
    return out


def read_columns(files: list[Path], columns: list[str]) -> pa.Table | None:
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, columns=columns))
        except (pa.ArrowException, OSError) as exc:
            raise OutputError(
                f"{f}: not a readable Parquet shard ({exc}). forge writes shards atomically, so it was damaged "
                f"afterwards; move it out of {f.parent} and re-run: its rows are generated again "
                "(answers still in the request cache are not re-sent)"
            ) from None
    return pa.concat_tables(tables) if tables else None


def write_atomic(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def clean_temp_files(directory: Path) -> None:
    """Temp files of a killed run: never renamed, so never counted; remove them."""
    if directory.is_dir():
        for p in directory.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)


class ChunkWriter:
    """Buffers rows and writes each full chunk as one shard, off the event loop, in order."""

    def __init__(self, directory: Path, task: int, schema: pa.Schema, rows_per_chunk: int) -> None:
        self.directory = directory
        self.task = task
        self.schema = schema
        self.rows_per_chunk = rows_per_chunk
        directory.mkdir(parents=True, exist_ok=True)
        clean_temp_files(directory)
        existing = shard_files(directory, task)
        self.next_chunk = (int(_SHARD.match(existing[-1].name).group(2)) + 1) if existing else 0
        self.buffer: list[dict[str, Any]] = []
        self.rows_written = 0
        self._lock = asyncio.Lock()

    async def add(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.rows_per_chunk:
            await self.flush()

    async def flush(self) -> None:
        """Write what is buffered (a short last chunk at the end or on interrupt)."""
        if not self.buffer:
            return
        rows, self.buffer = self.buffer, []
        async with self._lock:
            path = self.directory / f"{self.task:05d}_{self.next_chunk:05d}.parquet"
            self.next_chunk += 1
            await asyncio.to_thread(self._write, path, rows)
            self.rows_written += len(rows)

    def _write(self, path: Path, rows: list[dict[str, Any]]) -> None:
        write_atomic(path, pa.Table.from_pylist(rows, schema=self.schema))


def done_keys(data_dir: Path, rejected_dir: Path, task: int, retry_failed: bool) -> tuple[set, set]:
    """((id, rollout) pairs written, row keys rejected as a whole), from the shards on disk."""
    done: set[tuple[str, int]] = set()
    table = read_columns(shard_files(data_dir, task), ["id", "rollout"])
    if table is not None:
        done.update(zip(table.column("id").to_pylist(), table.column("rollout").to_pylist(), strict=True))
    whole: set[str] = set()
    table = read_columns(shard_files(rejected_dir, task), ["key", "rollout", "retryable"])
    if table is not None:
        columns = [table.column(c).to_pylist() for c in ("key", "rollout", "retryable")]
        for key, rollout, retryable in zip(*columns, strict=True):
            if retryable and retry_failed:
                continue
            if rollout < 0:
                whole.add(key)
            else:
                done.add((key, rollout))
    return done, whole


def check_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Record the run's settings on first use; on a re-run, refuse to mix with other settings."""
    path = out_dir / "forge_run.json"
    if not path.exists():
        write_json_atomic(path, manifest)
        return
    old = json.loads(path.read_text())
    changes = _diff(old, json.loads(json.dumps(manifest, default=str)))
    if changes:
        shown = "; ".join(changes[:5]) + ("; ..." if len(changes) > 5 else "")
        raise RunChanged(
            f"{out_dir} holds a run with other settings ({shown}). Re-run with output.on_change=fresh to "
            "move the old results aside and start over (cached answers are reused), or pick another output.dir."
        )


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def check_task_input(out_dir: Path, task: int, fingerprint: dict[str, Any]) -> None:
    path = out_dir / "state" / f"task_{task:05d}.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != fingerprint:
            raise RunChanged(
                f"the input of task {task} changed since {out_dir} was started "
                f"({old.get('rows')} rows then, {fingerprint.get('rows')} now, or their content differs). "
                "Re-run with output.on_change=fresh to start over (cached answers are reused), "
                "or pick another output.dir."
            )
    else:
        write_json_atomic(path, fingerprint)


def move_aside(out_dir: Path) -> Path | None:
    """output.on_change=fresh: keep the old results in .stale/<time>/; keep the request cache."""
    names = ["data", "rejected", "state", "stats", "forge_run.json", "stats.json"]
    present = [n for n in names if (out_dir / n).exists()]
    if not present:
        return None
    dest = out_dir / ".stale" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for name in present:
        shutil.move(str(out_dir / name), str(dest / name))
    return dest
