"""The run directory: Parquet shards written atomically, what is already done, and the run's
fingerprint. Config: conf/config.yaml `output:`.

A shard is `data/TTTTT_CCCCC.parquet` (task, chunk), written to a temp file, fsynced and
renamed, so a kill leaves whole shards or none. What is done is read back from the shards by
(id, rollout) — never from input order — so a re-run skips exactly those.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from forge.io.secrets import redact_strings, redact_table
from forge.storage.mirror import notify_commit

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
DATA_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("rollout", pa.int32()),
        ("messages", pa.list_(MESSAGE)),
        ("text", pa.string()),
        ("content_null", pa.bool_()),  # the engine answered with content null (text is "")
        ("reasoning", pa.string()),
        ("finish_reason", pa.string()),
        ("length_stopped", pa.bool_()),
        ("truncated", pa.bool_()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cached_tokens", pa.int64()),  # of prompt_tokens, served from the engine's prefix cache
        ("cost_usd", pa.float64()),  # at model.price_*; null when the run names no prices
        ("model", pa.string()),
        ("revision", pa.string()),
        ("engine", pa.string()),
        ("metadata", pa.string()),
    ]
)
# a generated row's answer counts: what stats.json totals and a rollout keeps per sample
ROW_COUNTS = (
    "finish_reason",
    "length_stopped",
    "truncated",
    "content_null",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost_usd",
)
REJECT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # the row's id, or @file:line when it has no usable id
        ("rollout", pa.int32()),  # -1: the whole row (all rollouts)
        ("stage", pa.string()),  # input | prompt | request
        ("reason", pa.string()),
        ("retryable", pa.bool_()),
        ("source", pa.string()),
        ("prompt", pa.string()),  # the raw value as JSON, cut at 10,000 characters
        ("step", pa.string()),  # a rollout: the step it reached (`step 2 (critique 1)`)
        ("answer", pa.string()),  # the raw answer that could not be used (a failed JSON schema)
    ]
)

log = logging.getLogger("forge")
_SHARD = re.compile(r"^(\d{5})_(\d{5})\.parquet$")


class NamedWriteError(OSError):
    """A write that failed (disk full, read-only) whose message already names the file."""


class RunChanged(RuntimeError):
    """The output dir holds a run with other input, sharding or generation settings."""


class OutputError(RuntimeError):
    """A file in the run dir that forge cannot read or write; the message names it and what to do."""


def write_failed(path: Path, exc: OSError) -> OutputError:
    """One line for a failed write: the path, the cause, and that a re-run picks up from there."""
    why = exc.strerror or str(exc)
    full = exc.errno == errno.ENOSPC or "No space left" in str(exc)
    why += " (ENOSPC)" if full and "ENOSPC" not in why else ""
    hint = "free some space" if full else "fix that"
    return OutputError(f"cannot write {path}: {why}; {hint} and re-run the same command to resume")


def check_output_dir(out_dir: Path) -> None:
    """output.dir must be a directory forge can create and write: checked before any engine
    starts, creating nothing (a refused command leaves no trace)."""
    existing = next((p for p in [out_dir, *out_dir.parents] if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        where = "" if existing == out_dir else f" ({existing} is in the way of {out_dir})"
        raise OutputError(f"output.dir: {existing} is a file, not a directory{where}; pick another output.dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        statvfs = os.statvfs(existing)
        why = "a read-only file system" if statvfs.f_flag & os.ST_RDONLY else "not writable by this user"
        raise OutputError(f"output.dir: cannot write to {existing}: {why}; pick another output.dir")


def create_output_dir(out_dir: Path) -> None:
    """Create output.dir for an accepted run; one line naming it if that fails."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise OutputError(f"output.dir: cannot create {out_dir}: {why}; pick another output.dir") from None


def shard_files(directory: Path, task: int | None = None) -> list[Path]:
    if not directory.is_dir():
        return []
    out = []
    for p in sorted(directory.iterdir()):
        m = _SHARD.match(p.name)
        if m and (task is None or int(m.group(1)) == task):
            out.append(p)
    return out


# rejected/ shards written before forge 0.1 named the row `key`; read them as `id`
OLD_NAMES = {"id": "key"}
# data/ columns added since the first release; older shards read them as null
ADDED_COLUMNS = {
    "content_null": pa.bool_(),
    "step": pa.string(),
    "answer": pa.string(),
    "cached_tokens": pa.int64(),
    "cost_usd": pa.float64(),
}


def read_columns(files: list[Path], columns: list[str]) -> pa.Table | None:
    tables = []
    for f in files:
        try:
            names = pq.read_schema(f).names
            old = {c: OLD_NAMES[c] for c in columns if c not in names and OLD_NAMES.get(c) in names}
            added = [c for c in columns if c not in names and c in ADDED_COLUMNS]
            wanted = [old.get(c, c) for c in columns if c not in added]
            table = pq.read_table(f, columns=wanted).rename_columns([c for c in columns if c not in added])
            for c in added:  # shards from before the column existed: null
                table = table.append_column(c, pa.nulls(table.num_rows, ADDED_COLUMNS[c]))
            tables.append(table.select(columns))
        except (pa.ArrowException, OSError) as exc:
            raise OutputError(
                f"{f}: not a readable Parquet shard ({exc}). forge writes shards atomically, so it was damaged "
                f"afterwards; move it out of {f.parent} and re-run: its rows are generated again "
                "(answers still in the request cache are not re-sent)"
            ) from None
    return pa.concat_tables(tables) if tables else None


def write_atomic(path: Path, table: pa.Table, use_dictionary: bool | list[str] = True) -> None:
    """Temp file, fsync, rename: a kill leaves the whole shard or none. A failed write (disk
    full) removes its temp file and raises OutputError naming the shard. `use_dictionary`:
    Parquet's dictionary encoding (for all columns, or the named ones)."""
    table = redact_table(table)  # the one masking path: no secret reaches a file
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd", use_dictionary=use_dictionary)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failed(path, exc) from None
    notify_commit()  # a remote run dir pushes it (forge/storage/mirror.py)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(redact_strings(data), indent=2, sort_keys=True, default=str))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failed(path, exc) from None
    notify_commit()


def clean_temp_files(directory: Path, prefix: str = "") -> None:
    """Temp files of a killed run: never renamed, so never counted; remove them. `prefix`: only
    the files of one task (`00003_`): other tasks of a Slurm array may be writing theirs now."""
    if directory.is_dir():
        for p in directory.glob(f".{prefix}*.tmp-*"):
            p.unlink(missing_ok=True)


class ChunkWriter:
    """Buffers rows and writes each full chunk as one shard, off the event loop, in order."""

    def __init__(self, directory: Path, task: int, schema: pa.Schema, rows_per_chunk: int) -> None:
        self.directory = directory
        self.task = task
        self.schema = schema
        self.rows_per_chunk = rows_per_chunk
        directory.mkdir(parents=True, exist_ok=True)
        clean_temp_files(directory, f"{task:05d}_")
        existing = shard_files(directory, task)
        self.next_chunk = (int(_SHARD.match(existing[-1].name).group(2)) + 1) if existing else 0
        self.buffer: list[dict[str, Any]] = []
        self.ends: list[bool] = []  # whether buffer[i] ends its group (a group never spans shards)
        self.rows_written = 0
        self._lock = asyncio.Lock()

    async def add(self, row: dict[str, Any]) -> None:
        await self.add_group([row])

    async def add_group(self, rows: list[dict[str, Any]]) -> None:
        """Rows that must land in one shard (a rollout's several output rows): a re-run counts a
        sample done when any of its rows is on disk, so a group is never split across shards."""
        self.buffer.extend(rows)
        self.ends.extend([False] * (len(rows) - 1) + [True])
        if len(self.buffer) >= self.rows_per_chunk:
            await self._write_chunks(whole_only=True)

    async def flush(self) -> None:
        """Write what is buffered (a short last chunk at the end or on interrupt)."""
        await self._write_chunks(whole_only=False)

    async def _write_chunks(self, whole_only: bool) -> None:
        # rows leave the buffer only under the lock: a writer cancelled while it waits for the lock
        # (another worker's error stopping the run) leaves them buffered for the final flush
        async with self._lock:
            while self.buffer and (len(self.buffer) >= self.rows_per_chunk or not whole_only):
                n = min(self.rows_per_chunk, len(self.buffer))
                while not self.ends[n - 1]:  # extend to the end of the group
                    n += 1
                rows = self.buffer[:n]
                del self.buffer[:n]
                del self.ends[:n]
                path = self.directory / f"{self.task:05d}_{self.next_chunk:05d}.parquet"
                self.next_chunk += 1
                # shielded: the thread writes the whole chunk even when the run is being stopped;
                # the error of a write whose waiter was cancelled is already the run's (or a
                # sibling's) reason to stop, so it is retrieved here rather than logged as a traceback
                write = asyncio.ensure_future(asyncio.to_thread(self._write, path, rows))
                write.add_done_callback(_retrieve)
                await asyncio.shield(write)
                self.rows_written += len(rows)

    def _write(self, path: Path, rows: list[dict[str, Any]]) -> None:
        write_atomic(path, pa.Table.from_pylist(rows, schema=self.schema))


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def done_keys(data_dir: Path, rejected_dir: Path, task: int, retry_failed: bool) -> tuple[set, set]:
    """((id, rollout) pairs written, row keys rejected as a whole), from the shards on disk."""
    done: set[tuple[str, int]] = set()
    table = read_columns(shard_files(data_dir, task), ["id", "rollout"])
    if table is not None:
        done.update(zip(table.column("id").to_pylist(), table.column("rollout").to_pylist(), strict=True))
    whole: set[str] = set()
    table = read_columns(shard_files(rejected_dir, task), ["id", "rollout", "retryable"])
    if table is not None:
        columns = [table.column(c).to_pylist() for c in ("id", "rollout", "retryable")]
        for key, rollout, retryable in zip(*columns, strict=True):
            if retryable and retry_failed:
                continue
            if rollout < 0:
                whole.add(key)
            else:
                done.add((key, rollout))
    return done, whole


def produced_anything(out_dir: Path, task: int | None = None) -> bool:
    """Whether the run dir holds rows of `task` (or of any task) made with its settings: written
    rows, or rows quarantined for good. Rows quarantined only for a transient or config-caused
    failure (retryable) are sent again anyway, so they pin nothing."""
    if shard_files(out_dir / "data", task):
        return True
    rejected = read_columns(shard_files(out_dir / "rejected", task), ["retryable"])
    return rejected is not None and not all(rejected.column("retryable").to_pylist())


# forge's own modules that moved (forge/stages/ since the recipes issue): a run dir that pinned a
# module by its old name (`rollout.fn: forge.rollout.library:chat`) resumes under the new one
RENAMED_MODULES = {"forge.rollout.": "forge.stages.generate.rollout.", "forge.curate.": "forge.stages.curate."}


def renamed_module(ref: str) -> str:
    """`forge.rollout.library:chat` -> `forge.stages.generate.rollout.library:chat` (else as is)."""
    for old, new in RENAMED_MODULES.items():
        if ref.startswith(old):
            return new + ref[len(old) :]
    return ref


def renamed_modules(value: Any) -> Any:
    """Every string of a pinned manifest with forge's renamed modules under their new names."""
    if isinstance(value, dict):
        return {k: renamed_modules(v) for k, v in value.items()}
    if isinstance(value, list):
        return [renamed_modules(v) for v in value]
    return renamed_module(value) if isinstance(value, str) else value


def check_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """On a re-run, refuse to mix results made with other settings. Writes nothing: the
    settings are pinned by record_manifest once the input has been read. A run that produced
    no row pins nothing, so a corrected command after a typo is accepted."""
    path = out_dir / "forge_run.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OutputError(f"{path}: unreadable ({exc}); move it away to accept the current settings") from None
    changes = _diff(renamed_modules(old), json.loads(json.dumps(redact_strings(manifest), default=str)))
    if changes and produced_anything(out_dir):
        shown = "; ".join(changes[:2]) + (f"; and {len(changes) - 2} more" if len(changes) > 2 else "")
        raise RunChanged(
            f"{out_dir} holds a run with other settings ({shown}); output.on_change=fresh moves it aside and "
            "starts over (reusing cached answers), or pick another output.dir"
        )


def record_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Pin the run's settings (first accepted run, or one replacing settings that produced nothing)."""
    path = out_dir / "forge_run.json"
    wanted = json.loads(json.dumps(redact_strings(manifest), default=str))  # as written
    if path.exists():
        try:
            if json.loads(path.read_text()) == wanted:
                return
        except (OSError, ValueError):
            pass
    write_json_atomic(path, wanted)


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    if old == new:
        return []
    key = prefix.rstrip(".")
    if isinstance(old, list) and isinstance(new, list):
        if len(old) == len(new) and all(isinstance(x, dict) for x in old + new):  # e.g. the mix's sources
            return [c for i, (a, b) in enumerate(zip(old, new, strict=True)) for c in _diff(a, b, f"{key}[{i}].")]
        changed = len([x for x in new if x not in old])  # e.g. the input's files: counted, not listed
        return [f"{key}: {len(old)} -> {len(new)} entries, {changed} new or changed"]
    return [f"{key}: {_short(old)} -> {_short(new)}"]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_task_input(out_dir: Path, task: int, fingerprint: dict[str, Any]) -> None:
    """Refuse a changed input under a task that already produced rows; else record it."""
    path = out_dir / "state" / f"task_{task:05d}.json"
    if path.exists() and produced_anything(out_dir, task):
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old is not None and old != fingerprint:
            raise RunChanged(
                f"the input of task {task} changed since {out_dir} was started "
                f"({old.get('rows')} rows then, {fingerprint.get('rows')} now, or their content differs). "
                "Re-run with output.on_change=fresh to start over (a generation run reuses its cached answers), "
                "or pick another output.dir."
            )
        if old == fingerprint:
            return
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
        if name == "state":  # its lock files stay: this process holds run.lock, others look there
            (dest / name).mkdir(exist_ok=True)
            for p in (out_dir / name).iterdir():
                if p.suffix != ".lock":
                    shutil.move(str(p), str(dest / name / p.name))
            continue
        shutil.move(str(out_dir / name), str(dest / name))
    return dest


def prune_rejected(rejected_dir: Path, data_dir: Path, task: int) -> int:
    """Drop rows quarantined as retryable that a later session answered, or quarantined again
    (only the latest entry of a row stays), so rejected/ holds each row at most once and agrees
    with stats.json. Each shard is rewritten atomically under its own name (emptied, never
    deleted, so a published copy is replaced too). Returns the rows dropped."""
    files = shard_files(rejected_dir, task)
    if not files:
        return 0
    written = read_columns(shard_files(data_dir, task), ["id", "rollout"])
    answered = (
        set(zip(written.column("id").to_pylist(), written.column("rollout").to_pylist(), strict=True))
        if written is not None
        else set()
    )
    tables = [read_columns([f], list(REJECT_SCHEMA.names)) for f in files]
    keys = [list(zip(t.column("id").to_pylist(), t.column("rollout").to_pylist(), strict=True)) for t in tables]
    last = {key: (i, j) for i, rows in enumerate(keys) for j, key in enumerate(rows)}
    dropped = 0
    for i, (f, table, rows) in enumerate(zip(files, tables, keys, strict=True)):
        retryable = table.column("retryable").to_pylist()
        keep = [
            not (retry and (key in answered or last[key] != (i, j)))
            for j, (key, retry) in enumerate(zip(rows, retryable, strict=True))
        ]
        if all(keep):
            continue
        dropped += keep.count(False)
        write_atomic(f, table.filter(pa.array(keep, pa.bool_())).cast(REJECT_SCHEMA))
    return dropped


FINISHED = "finished.json"  # state/finished.json: the run's last session finished (stats and card written)
STARTED = "started.json"  # state/started.json: a session started writing and has not finished


def mark_started(out_dir: Path) -> None:
    """An accepted session starts writing: the run dir is no longer a finished input for the
    next stage until this session (or Slurm's finalize job) finishes it."""
    write_json_atomic(out_dir / "state" / STARTED, {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    (out_dir / "state" / FINISHED).unlink(missing_ok=True)


def mark_finished(out_dir: Path, stats: dict[str, Any]) -> None:
    """The run dir is whole: every shard done, stats.json and the card written."""
    done = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": stats.get("rows_written")}
    write_json_atomic(out_dir / "state" / FINISHED, done)
    (out_dir / "state" / STARTED).unlink(missing_ok=True)


def is_finished(out_dir: Path) -> bool:
    """Finished: its last session finished. A dir from before these markers (neither is there)
    counts as finished when its card and stats.json are written and no shard ended unfinished."""
    state = out_dir / "state"
    if (state / STARTED).is_file():
        return False
    if (state / FINISHED).is_file():
        return True
    try:
        stats = json.loads((out_dir / "stats.json").read_text())
    except (OSError, ValueError):
        return False
    statuses = set((stats.get("task_status") or {}).values())
    return (out_dir / "README.md").is_file() and statuses <= {"complete"}


def unfinished_inputs(out_dir: Path) -> dict[str, str]:
    """Inputs this run read while they were unfinished (dataset.allow_unfinished), from its
    manifest: {input: why}; for stats.json and the card."""
    try:
        dataset = json.loads((out_dir / "forge_run.json").read_text()).get("dataset") or {}
    except (OSError, ValueError):
        return {}
    found = {dataset.get("name"): dataset.get("unfinished")}
    found.update({s.get("name"): s.get("unfinished") for s in dataset.get("sources") or []})
    return {str(k): "was not finished when it was read" for k, v in found.items() if v}


def start_fresh(cfg: Any, wanted: dict[str, Any], what: str, changed: RunChanged) -> None:
    """output.on_change=fresh: move the changed run aside and start over; else raise `changed`."""
    if cfg.output.on_change != "fresh" or cfg.cluster.task_index is not None:
        raise changed  # a Slurm task never moves the dir its sibling tasks are writing
    out_dir = Path(cfg.output.dir)
    moved = move_aside(out_dir)
    log.warning("output.on_change=fresh: %s moved to %s", what, moved)
    check_manifest(out_dir, wanted)
