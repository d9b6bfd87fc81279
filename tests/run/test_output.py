"""The run dir's rules, without an engine: what pins settings, output-dir checks, stale rejects."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forge.run.output import (
    DATA_SCHEMA,
    REJECT_SCHEMA,
    OutputError,
    RunChanged,
    check_manifest,
    check_output_dir,
    done_keys,
    prune_rejected,
    read_columns,
    record_manifest,
    write_atomic,
)


def _data_row(i: str, rollout: int = 0) -> dict:
    return {"id": i, "rollout": rollout, "messages": [], "text": "t", "length_stopped": False, "truncated": False}


def _reject(i: str, rollout: int, retryable: bool) -> dict:
    return {"id": i, "rollout": rollout, "stage": "request", "reason": "HTTP 500", "retryable": retryable}


def test_settings_are_pinned_only_once_rows_exist(tmp_path: Path) -> None:
    check_manifest(tmp_path, {"a": 1})  # a new dir: accepted, nothing written
    assert not (tmp_path / "forge_run.json").exists()
    record_manifest(tmp_path, {"a": 1})
    check_manifest(tmp_path, {"a": 2})  # other settings, but no row yet: accepted (a typo pins nothing)
    (tmp_path / "data").mkdir()
    write_atomic(tmp_path / "data" / "00000_00000.parquet", pa.Table.from_pylist([_data_row("x")], schema=DATA_SCHEMA))
    with pytest.raises(RunChanged, match="a: 1 -> 2"):
        check_manifest(tmp_path, {"a": 2})


def test_output_dir_checks(tmp_path: Path) -> None:
    check_output_dir(tmp_path / "new" / "run")  # creatable: fine, and nothing created
    assert not (tmp_path / "new").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(OutputError, match=r"f is in the way of"):
        check_output_dir(tmp_path / "f" / "run")


def test_answered_retryable_rejects_are_pruned(tmp_path: Path) -> None:
    data, rej = tmp_path / "data", tmp_path / "rejected"
    data.mkdir()
    rej.mkdir()
    rows = [_reject("a", 0, True), _reject("b", 0, True), _reject("c", 0, False)]
    write_atomic(rej / "00000_00000.parquet", pa.Table.from_pylist(rows, schema=REJECT_SCHEMA))
    write_atomic(data / "00000_00000.parquet", pa.Table.from_pylist([_data_row("a")], schema=DATA_SCHEMA))
    assert prune_rejected(rej, data, 0) == 1
    left = pq.read_table(rej / "00000_00000.parquet").to_pylist()
    assert [r["id"] for r in left] == ["b", "c"]
    assert prune_rejected(rej, data, 0) == 0  # idempotent


def test_rejected_shards_of_older_runs_name_the_row_key(tmp_path: Path) -> None:
    rej = tmp_path / "rejected"
    rej.mkdir()
    old = pa.schema([("key" if f.name == "id" else f.name, f.type) for f in REJECT_SCHEMA])
    pq.write_table(
        pa.Table.from_pylist([{"key": "z", "rollout": -1, "retryable": False}], schema=old), rej / "00000_00000.parquet"
    )
    table = read_columns([rej / "00000_00000.parquet"], ["id", "rollout"])
    assert table.column("id").to_pylist() == ["z"]
    assert done_keys(tmp_path / "data", rej, 0, True) == (set(), {"z"})
    # data shards from before content_null read it as null
    data = tmp_path / "data"
    data.mkdir()
    schema = pa.schema([f for f in DATA_SCHEMA if f.name != "content_null"])
    pq.write_table(pa.Table.from_pylist([_data_row("q")], schema=schema), data / "00000_00000.parquet")
    assert read_columns([data / "00000_00000.parquet"], ["id", "content_null"]).to_pylist() == [
        {"id": "q", "content_null": None}
    ]


def test_a_row_quarantined_again_stays_once(tmp_path: Path) -> None:
    data, rej = tmp_path / "data", tmp_path / "rejected"
    rej.mkdir()
    write_atomic(rej / "00000_00000.parquet", pa.Table.from_pylist([_reject("a", 0, True)], schema=REJECT_SCHEMA))
    write_atomic(rej / "00000_00001.parquet", pa.Table.from_pylist([_reject("a", 0, True)], schema=REJECT_SCHEMA))
    assert prune_rejected(rej, data, 0) == 1
    assert [len(pq.read_table(f)) for f in sorted(rej.iterdir())] == [0, 1]


def test_a_group_of_rows_never_spans_two_shards(tmp_path: Path) -> None:
    """A rollout's several output rows land in one shard: a re-run counts the sample done when
    any of them is on disk."""
    import asyncio

    import pyarrow as pa

    from forge.run.output import ChunkWriter

    schema = pa.schema([("id", pa.string()), ("rollout", pa.int32())])
    writer = ChunkWriter(tmp_path / "data", 0, schema, rows_per_chunk=4)

    async def fill() -> None:
        for i in range(5):
            await writer.add_group([{"id": f"r{i}", "rollout": 0}] * 3)
        await writer.flush()

    asyncio.run(fill())
    shards = [pq.read_table(p).column("id").to_pylist() for p in sorted((tmp_path / "data").glob("*.parquet"))]
    assert [len(s) for s in shards] == [6, 6, 3]  # each chunk is cut at the end of a group
    assert all(len(set(s)) * 3 == len(s) for s in shards)


def test_finished_markers_and_run_dirs_from_before_them(tmp_path: Path) -> None:
    import json

    from forge.run.output import is_finished, mark_finished, mark_started, move_aside

    (tmp_path / "state").mkdir()
    assert not is_finished(tmp_path)  # nothing written yet
    # a dir from before the markers: finished when its card and stats say every shard completed
    (tmp_path / "README.md").write_text("# card\n")
    (tmp_path / "stats.json").write_text(json.dumps({"task_status": {"0": "complete", "1": "complete"}}))
    assert is_finished(tmp_path)
    (tmp_path / "stats.json").write_text(json.dumps({"task_status": {"0": "complete", "1": "interrupted"}}))
    assert not is_finished(tmp_path)
    mark_started(tmp_path)
    assert not is_finished(tmp_path)
    mark_finished(tmp_path, {"rows_written": 3})
    assert is_finished(tmp_path)
    mark_started(tmp_path)  # a new session writes it: not a finished input until it finishes
    assert not is_finished(tmp_path)
    # output.on_change=fresh moves state/ aside but its lock files stay where writers look
    (tmp_path / "state" / "run.lock").write_text("pid 1 on host")
    moved = move_aside(tmp_path)
    assert (tmp_path / "state" / "run.lock").exists() and not (moved / "state" / "run.lock").exists()
    assert (moved / "state" / "started.json").exists()


def test_a_run_dir_that_pinned_a_module_by_its_old_name_resumes(tmp_path: Path) -> None:
    """Run dirs written before forge/stages/ pinned `rollout.fn: forge.rollout.library:chat`; the
    same settings under the new module names are the same run (and a real change still is not)."""
    import json

    from forge.run.output import RunChanged, check_manifest

    old = {"version": 1, "rollout": {"fn": "forge.rollout.library:chat", "rounds": 1}}
    (tmp_path / "forge_run.json").write_text(json.dumps(old))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "00000_00000.parquet").write_bytes(b"x")
    check_manifest(
        tmp_path, {"version": 1, "rollout": {"fn": "forge.stages.generate.rollout.library:chat", "rounds": 1}}
    )
    with pytest.raises(RunChanged, match="rollout.fn"):
        check_manifest(
            tmp_path, {"version": 1, "rollout": {"fn": "forge.stages.generate.rollout.library:judge", "rounds": 1}}
        )
