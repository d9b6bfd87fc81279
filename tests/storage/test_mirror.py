"""The remote run dir's commit protocol (forge/storage/mirror.py) on fsspec's in-memory store: what
a push uploads and in which order, what a pull on another machine gets, the request cache's
segments, and the lease of forge/storage/lease.py."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import fsspec
import pytest

from forge.storage.config import StorageConfig
from forge.storage.fs import StorageError, configure, explain, is_remote, retrying
from forge.storage.lease import Lease, LeaseHeld, is_live
from forge.storage.mirror import Mirror, export_cache_segments, load_cache_segments
from forge.storage.readahead import read_ahead


@pytest.fixture
def store():
    """A fresh in-memory store (fsspec's memory://), and forge's storage settings reset."""
    configure(StorageConfig(backoff_s=0.01, max_retries=2))
    fs = fsspec.filesystem("memory")
    root = f"/t{time.time_ns()}"
    yield fs, root
    fs.rm(root, recursive=True) if fs.exists(root) else None


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-1")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_is_remote_tells_urls_from_paths() -> None:
    assert (
        is_remote("s3://b/k") and is_remote("gs://b/") and is_remote("hf://datasets/a/b") and is_remote("https://x/y")
    )
    assert not is_remote("/tmp/x") and not is_remote("forge://sample") and not is_remote("file:///tmp/x")
    assert not is_remote("out/run") and not is_remote("owner/name")


def test_push_uploads_chunks_before_the_records_and_skips_temp_and_lock_files(store, tmp_path: Path) -> None:
    fs, root = store
    local = tmp_path / "scratch"
    mirror = Mirror(f"memory://{root}", local)
    mirror.pull()
    _write(local / "data" / "00000_00000.parquet", "chunk0")
    _write(local / "state" / "batch_00000.json", '{"batches": 1}')
    (local / "data" / ".00000_00001.parquet.tmp-9").write_text("half a chunk")
    (local / "state" / "run.lock").write_text("pid 1")
    (local / "cache").mkdir()
    sqlite3.connect(local / "cache" / "task_00000.sqlite").close()
    order: list[str] = []
    put = fs.pipe_file

    def spy(path: str, data: bytes, **kw) -> None:  # noqa: ANN003
        order.append(path.split(root + "/")[-1])
        return put(path, data, **kw)

    fs.pipe_file = spy
    try:
        assert mirror.push() == 2
    finally:
        del fs.pipe_file
    assert order == ["data/00000_00000.parquet", "state/batch_00000.json"]
    assert sorted(p.split(root + "/")[-1] for p in fs.find(root)) == sorted(order)
    assert mirror.push() == 0  # nothing changed: nothing sent again
    # a redone batch's chunk removed locally is removed remotely
    (local / "data" / "00000_00000.parquet").unlink()
    mirror.push()
    assert not fs.exists(f"{root}/data/00000_00000.parquet")


def test_a_pull_elsewhere_gets_what_the_store_holds_and_drops_what_it_does_not(store, tmp_path: Path) -> None:
    fs, root = store
    first = Mirror(f"memory://{root}", tmp_path / "a")
    first.pull()
    _write(tmp_path / "a" / "data" / "00000_00000.parquet", "chunk0")
    _write(tmp_path / "a" / "state" / "batch_00000.json", '{"batches": 1}')
    first.push()
    other = tmp_path / "b"
    _write(other / "data" / "00000_00007.parquet", "a chunk the store never got")
    second = Mirror(f"memory://{root}", other)
    assert second.pull() == 2
    assert (other / "data" / "00000_00000.parquet").read_text() == "chunk0"
    assert not (other / "data" / "00000_00007.parquet").exists()
    # the same machine again: nothing downloaded twice; a file the store changed is
    assert Mirror(f"memory://{root}", other).pull() == 0
    fs.pipe_file(f"{root}/state/batch_00000.json", b'{"batches": 2}')
    assert Mirror(f"memory://{root}", other).pull() == 1
    assert json.loads((other / "state" / "batch_00000.json").read_text()) == {"batches": 2}


def test_paid_answers_reach_another_machine_through_cache_segments(store, tmp_path: Path) -> None:
    fs, root = store
    a = tmp_path / "a"
    (a / "cache").mkdir(parents=True)
    db = a / "cache" / "task_00000.sqlite"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        con.executemany("INSERT INTO answers VALUES (?, ?)", [(f"k{i}", f"v{i}") for i in range(5)])
    mirror = Mirror(f"memory://{root}", a)
    mirror.push()
    with sqlite3.connect(db) as con:
        con.executemany("INSERT INTO answers VALUES (?, ?)", [(f"k{i}", f"v{i}") for i in range(5, 8)])
    mirror.push()
    segments = [p for p in fs.find(root) if "/cache/task_00000.seg/" in p]
    assert len(segments) == 2 and not [p for p in fs.find(root) if p.endswith(".sqlite")]
    assert export_cache_segments(a) == 0  # every answer exported once
    b = tmp_path / "b"
    Mirror(f"memory://{root}", b).pull()
    with sqlite3.connect(b / "cache" / "task_00000.sqlite") as con:
        assert dict(con.execute("SELECT key, value FROM answers")) == {f"k{i}": f"v{i}" for i in range(8)}
    assert load_cache_segments(b) == 0  # loaded once
    assert export_cache_segments(b) == 0  # and not exported back


def test_store_errors_are_one_line_naming_the_url_and_only_transient_ones_are_retried() -> None:
    configure(StorageConfig(backoff_s=0.01, max_retries=3))
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OSError("An error occurred (InternalError) when calling PutObject: 500 Internal Server Error")
        return "ok"

    assert retrying("s3://b/run", "write x", flaky) == "ok" and len(calls) == 3
    denied = []

    def deny() -> None:
        denied.append(1)
        raise PermissionError("Access Denied")

    with pytest.raises(StorageError) as err:
        retrying("s3://b/run", "write data/0.parquet", deny)
    assert len(denied) == 1
    assert str(err.value).startswith("s3://b/run: cannot write data/0.parquet: access denied")
    line = str(explain("s3://b", OSError("InvalidAccessKeyId: The AWS Access Key Id does not exist"), "list it"))
    assert "credentials were refused or have expired" in line and "\n" not in line
    assert "no such bucket" in str(explain("s3://nope", FileNotFoundError("nope"), "list it"))


def test_a_lease_refuses_a_second_writer_until_its_holder_is_gone(store) -> None:
    fs, root = store
    url = f"memory://{root}/run"
    first = Lease(url, "run", "busy: {holder}")
    first.acquire()
    try:
        with pytest.raises(LeaseHeld, match=f"busy: pid {os.getpid()} on"):
            Lease(url, "run", "busy: {holder}").acquire()
    finally:
        first.release()
    assert not fs.exists(f"{root}/run/state/run.lease")
    assert not is_live({"pid": 1, "host": "elsewhere", "boot": "x", "renewed_at": time.time() - 3600})
    assert is_live({"pid": 1, "host": "elsewhere", "boot": "x", "renewed_at": time.time()})


def test_read_ahead_keeps_order_and_raises_where_the_reader_failed() -> None:
    assert list(read_ahead(iter(range(1000)), 64)) == list(range(1000))

    def broken():  # noqa: ANN202
        yield from range(300)
        raise ValueError("bad row 300")

    got = []
    with pytest.raises(ValueError, match="bad row 300"):
        for x in read_ahead(broken(), 64):
            got.append(x)
    assert got == list(range(300))


def test_a_lease_taken_over_stops_its_old_holder_at_its_next_commit(store, tmp_path: Path) -> None:
    fs, root = store
    configure(StorageConfig(lease_s=2.0))  # renewed (and checked) every 0.5 s
    url = f"memory://{root}/run"
    lease = Lease(url, "run", "busy: {holder}")
    lease.acquire()
    mirror = Mirror(url, tmp_path / "s")
    mirror.lease = lease
    try:
        fs.pipe_file(f"{root}/run/state/run.lease", json.dumps({"pid": 7, "host": "other-node", "token": "x"}).encode())
        deadline = time.monotonic() + 10
        while lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(LeaseHeld, match="held by pid 7 on other-node"):
            mirror.raise_if_failed()
    finally:
        lease.release()
    assert fs.exists(f"{root}/run/state/run.lease")  # the new holder's lease is left alone
