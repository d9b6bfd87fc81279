"""forge/run/batch.py: the runner every batch stage shares — chunked output, quarantine, resume."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from conftest import read_rows, write_jsonl

from forge.config import DatasetConfig, ForgeConfig, SourceSpec
from forge.io.mix import open_mix
from forge.run.batch import BatchResult, drop_unrecorded, read_state, reject_row, run_batch_task

SCHEMA = pa.schema([("id", pa.string()), ("n", pa.int64())])


class KeepEven:
    """A minimal real stage: keeps rows with an even `n`, rejects the others. `fail_at` is an
    injected fault (a crash in the middle of batch k), which no real stage produces on demand."""

    name = "keep_even"

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.batches = 0
        self.restored: list[str] = []

    def fingerprint(self) -> dict:
        return {}

    def restore(self, kept: pa.Table | None) -> None:
        self.restored = kept.column("id").to_pylist() if kept is not None else []

    def process(self, rows) -> BatchResult:
        if self.batches == self.fail_at:
            raise RuntimeError("injected crash")
        self.batches += 1
        kept = [{"id": str(r.row.record["n"]), "n": r.row.record["n"]} for r in rows if r.row.record["n"] % 2 == 0]
        rejected = [reject_row(r, "s", "odd", "n is odd", r.row.record["n"]) for r in rows if r.row.record["n"] % 2]
        return BatchResult({"data": pa.Table.from_pylist(kept, schema=SCHEMA)}, rejected, {"rows_kept": len(kept)})


def _setup(tmp_path: Path, n: int) -> tuple[ForgeConfig, object]:
    data = write_jsonl(tmp_path / "d.jsonl", [{"n": i} for i in range(n)])
    cfg = ForgeConfig()
    cfg.output.dir = str(tmp_path / "out")
    cfg.output.examples_per_chunk = 10
    cfg.run.progress = False
    return cfg, open_mix(DatasetConfig(sources=[SourceSpec(name=str(data))]))


def test_each_batch_is_one_chunk_of_every_output(tmp_path: Path) -> None:
    cfg, mix = _setup(tmp_path, 95)
    state = run_batch_task(cfg, 0, KeepEven(), mix, 95)
    out = Path(cfg.output.dir)
    assert state["batches"] == 10 and state["rows_in"] == 95 and state["counts"]["rows_kept"] == 48
    assert len(list((out / "data").glob("*.parquet"))) == 10
    assert sorted(int(r["id"]) for r in read_rows(out)) == list(range(0, 95, 2))
    rejected = read_rows(out, "rejected")
    assert {r["stage"] for r in rejected} == {"keep_even"} and len(rejected) == 47
    assert all(r["where"].endswith(f":{int(r['value']) + 1}") for r in rejected)


def test_a_crash_mid_batch_resumes_exactly_once(tmp_path: Path) -> None:
    cfg, mix = _setup(tmp_path, 95)
    out = Path(cfg.output.dir)
    with pytest.raises(RuntimeError, match="injected"):
        run_batch_task(cfg, 0, KeepEven(fail_at=4), mix, 95)
    assert read_state(out, 0)["batches"] == 4
    # a kill after some of batch 4's chunks were written: a leftover chunk past the recorded state
    (out / "data" / "00000_00004.parquet").write_bytes((out / "data" / "00000_00003.parquet").read_bytes())
    stage = KeepEven()
    state = run_batch_task(cfg, 0, stage, mix, 95)
    assert len(stage.restored) == 20  # the ids kept by batches 0-3, for stages that carry state
    assert state["rows_in"] == 95 and state["counts"]["rows_kept"] == 48
    ids = [int(r["id"]) for r in read_rows(out)]
    assert sorted(ids) == list(range(0, 95, 2))
    assert len(read_rows(out, "rejected")) == 47


def test_drop_unrecorded_removes_only_chunks_past_the_state(tmp_path: Path) -> None:
    for d in ("data", "rejected", "pools/p"):
        (tmp_path / d).mkdir(parents=True)
        for k in range(3):
            (tmp_path / d / f"00000_{k:05d}.parquet").write_bytes(b"x")
        (tmp_path / d / "00001_00005.parquet").write_bytes(b"x")
    assert drop_unrecorded(tmp_path, 0, 2) == 3
    assert sorted(p.name for p in (tmp_path / "pools/p").iterdir()) == [
        "00000_00000.parquet",
        "00000_00001.parquet",
        "00001_00005.parquet",
    ]


class KeepEvenAhead(KeepEven):
    """KeepEven with `submit`: the runner hands over batch k+1 before it waits for batch k (a GPU
    stage's overlap). Records the order of events; `fail_at` crashes batch k's wait."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.events: list[str] = []
        self.fail_wait = fail_at
        self.submitted = 0

    def submit(self, rows):
        k = self.submitted
        self.submitted += 1
        self.events.append(f"submit {k}")

        def wait() -> BatchResult:
            self.events.append(f"wait {k}")
            if k == self.fail_wait:
                raise RuntimeError("injected crash")
            return KeepEven.process(self, rows)

        return wait


def test_a_stage_with_submit_gets_the_next_batch_before_this_one_is_awaited(tmp_path: Path) -> None:
    cfg, mix = _setup(tmp_path, 35)
    stage = KeepEvenAhead()
    state = run_batch_task(cfg, 0, stage, mix, 35)
    assert stage.events == ["submit 0", "submit 1", "wait 0", "submit 2", "wait 1", "submit 3", "wait 2", "wait 3"]
    assert state["batches"] == 4 and sorted(int(r["id"]) for r in read_rows(Path(cfg.output.dir))) == list(
        range(0, 35, 2)
    )


def test_a_crash_while_the_next_batch_is_in_flight_resumes_exactly_once(tmp_path: Path) -> None:
    cfg, mix = _setup(tmp_path, 35)
    out = Path(cfg.output.dir)
    with pytest.raises(RuntimeError, match="injected"):
        run_batch_task(cfg, 0, KeepEvenAhead(fail_at=2), mix, 35)
    assert read_state(out, 0)["batches"] == 2  # batch 3 was submitted, never recorded
    state = run_batch_task(cfg, 0, KeepEvenAhead(), mix, 35)
    assert state["rows_in"] == 35
    assert sorted(int(r["id"]) for r in read_rows(out)) == list(range(0, 35, 2))
    assert len(read_rows(out, "rejected")) == 17
