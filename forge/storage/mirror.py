"""A remote run dir worked on through local scratch: pulled down at the start, pushed up as the
run goes (at every chunk, at least every storage.sync_every_s, and at the end).

The commit protocol. forge writes every file of a run dir locally as it always does: to a temp
name, then renamed, in an order where any prefix is a valid state (a chunk before the record
that counts it). An object store makes an object visible only once its upload is whole (a PUT,
or a completed multipart upload). A push (Mirror.push) snapshots the changed records first, then
uploads the payload (chunks, arrays, shards) and only then the record snapshots, oldest first; so
a chunk is in the store whole or not at all, and no record there names a chunk that is not.
Records scratch no longer has are deleted before, payload after (a redone batch's chunks).

The request cache stays a local sqlite file (cache/task_T.sqlite, never uploaded whole); each push
first exports the answers added since the last one as a segment file (cache/task_T.seg/*.parquet),
uploaded like any file. A pull on another machine loads every segment into its local cache, so a
resume there replays every answer already paid for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from forge.storage.fs import StorageError, filesystem, first_line, join, retrying, settings

log = logging.getLogger("forge.storage.mirror")
MARKER = ".forge-mirror.json"  # in scratch: each file as last pulled or pushed (size, mtime, etag)
# never uploaded: temp files, flock files, the live sqlite cache and its side files, the marker
LOCAL_ONLY = re.compile(
    r"(^|/)\.[^/]*\.tmp-|\.tmp$|(^|/)\.partial/|\.lock$|\.lease$|\.sqlite(-wal|-shm|-journal)?$|\.suspect$|\.damaged-|^\.forge-"
)
PAYLOAD = re.compile(r"\.(parquet|npy|bin|idx|arrow)$")  # never a record of what is done
UPLOAD_WORKERS = 8
WHOLE_PUT_BYTES = 32 << 20  # a file up to this is sent from memory in one request
LAZY = re.compile(r"\.log$")  # appended all the time: pushed at most every LAZY_S (and at the end)
LAZY_S = 60.0
SEGMENTS = ".seg"  # cache/task_T.sqlite -> cache/task_T.seg/<stamp>.parquet
MIN_ROUND_GAP_S = 0.5
PROGRESS_S = 5.0  # a long pull logs its progress and ETA this often
_active: weakref.WeakSet[Mirror] = weakref.WeakSet()


def notify_commit() -> None:
    """A file of a run dir was committed locally (forge/run/output.py): wake every mirror's
    pusher, and stop the run here, with the store's one line, if a push has failed."""
    for mirror in list(_active):
        mirror.wake()
        mirror.raise_if_failed()


def _etag(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "md5Hash", "blob_id", "LastModified", "mtime", "last_modified", "created"):
        if info.get(key):
            return str(info[key])
    return ""


class Mirror:
    """The remote run dir `url` through the local directory `scratch`."""

    def __init__(self, url: str, scratch: Path) -> None:
        self.url = url.rstrip("/")
        self.scratch = scratch
        self.fs, self.root = filesystem(self.url)
        self.known: dict[str, dict[str, Any]] = {}  # rel -> {size, mtime_ns, etag}
        self._lock = threading.Lock()  # one push at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: StorageError | None = None
        self.lease: Any = None  # the run dir's Lease: a lost one stops the run at its next commit
        self._lazy_at: dict[str, float] = {}
        self.bytes_up = 0
        self.bytes_down = 0

    # ---- remote listing and local files
    def remote_files(self) -> dict[str, dict[str, Any]]:
        """rel path -> info of every object under the run dir."""

        def find() -> dict[str, Any]:
            try:
                return self.fs.find(self.root, detail=True)
            except FileNotFoundError:
                return {}

        found = retrying(self.url, "list it", find)
        prefix = self.root.rstrip("/") + "/"
        out = {}
        for path, info in found.items():
            if info.get("type", "file") != "file" or not path.startswith(prefix):
                continue
            out[path[len(prefix) :]] = info
        return out

    def local_files(self, payload: bool | None = None) -> dict[str, os.stat_result]:
        """rel path -> stat of every file scratch would upload (only payload, only records)."""
        out = {}
        base = str(self.scratch)
        for dirpath, _, names in os.walk(base):
            for name in names:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, base).replace(os.sep, "/")
                if LOCAL_ONLY.search(rel):
                    continue
                if payload is not None and bool(PAYLOAD.search(rel)) != payload:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    out[rel] = os.stat(full)
        return out

    def _load_marker(self) -> None:
        try:
            self.known = json.loads((self.scratch / MARKER).read_text())
        except (OSError, ValueError):
            self.known = {}

    def _save_marker(self) -> None:
        tmp = self.scratch / f"{MARKER}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(self.known))
        os.replace(tmp, self.scratch / MARKER)

    # ---- pull
    def pull(self, include: Callable[[str], bool] | None = None) -> int:
        """Make scratch what the remote dir holds (the local request cache is kept, and every
        remote cache segment loaded into it); returns the files downloaded. `include`: only the
        files it accepts (forge-status reads the small ones)."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        self._load_marker()
        remote = self.remote_files()
        if include is not None:
            remote = {rel: info for rel, info in remote.items() if include(rel)}
        local = self.local_files()
        for rel in set(local) - set(remote):
            if rel.startswith("cache/") and SEGMENTS + "/" in rel:
                continue  # answers exported but not yet uploaded: the next push takes them
            (self.scratch / rel).unlink(missing_ok=True)
            self.known.pop(rel, None)
        fetched = 0
        total = sum(int(i.get("size") or 0) for i in remote.values())
        t0 = last = time.monotonic()
        for rel, info in sorted(remote.items()):
            if time.monotonic() - last > PROGRESS_S and self.bytes_down:
                last = time.monotonic()
                rate = self.bytes_down / (last - t0)
                eta = (total - self.bytes_down) / rate if rate else 0
                log.info(
                    "%s: pulled %.0f of %.0f MB (%.1f MB/s), ETA %s",
                    self.url,
                    self.bytes_down / 1e6,
                    total / 1e6,
                    rate / 1e6,
                    time.strftime("%H:%M:%S", time.gmtime(eta)),
                )
            if LOCAL_ONLY.search(rel):
                continue
            etag = _etag(info)
            have = local.get(rel)
            was = self.known.get(rel)
            if (
                have is not None
                and was is not None
                and was.get("etag") == etag
                and have.st_size == was.get("size")
                and have.st_mtime_ns == was.get("mtime_ns")
            ):
                continue
            dest = self.scratch / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
            retrying(self.url, f"read {rel}", lambda r=rel, t=tmp: self.fs.get_file(join(self.root, r), str(t)))
            os.replace(tmp, dest)
            st = dest.stat()
            self.bytes_down += st.st_size
            self.known[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "etag": etag}
            fetched += 1
        self._save_marker()
        load_cache_segments(self.scratch)
        return fetched

    # ---- push
    def push(self, final: bool = False) -> int:
        """Bring the store up to date with scratch; returns the files uploaded.

        1. Snapshot the records that changed (their bytes, read now), then list the payload. A
           record is written after the chunks it counts, so every chunk a snapshot counts is
           already on disk when the payload is listed, whatever happens after.
        2. Delete the records scratch no longer has (`finished.json` when a session starts, an
           old run's state when `output.on_change=fresh` moved it aside): the store never shows
           an old record over new chunks.
        3. Upload the changed payload, in parallel; a file rewritten meanwhile waits, and so do
           the records this time.
        4. Upload the record snapshots one at a time, in the order they were written.
        5. Delete the payload scratch no longer has (a redone batch's chunks).
        """
        with self._lock:
            self._check_lease()
            export_cache_segments(self.scratch)
            now = time.monotonic()
            records: list[tuple[int, str, os.stat_result, bytes | None]] = []
            present_records: set[str] = set()
            for rel, st in self.local_files(payload=False).items():
                present_records.add(rel)
                if self._same(rel, st):
                    continue
                if LAZY.search(rel) and not final and now - self._lazy_at.get(rel, 0.0) < LAZY_S:
                    continue
                try:
                    body = (self.scratch / rel).read_bytes() if st.st_size <= WHOLE_PUT_BYTES else None
                    st = (self.scratch / rel).stat() if body is None else st
                except FileNotFoundError:
                    continue
                if body is not None and len(body) != st.st_size:  # rewritten between stat and read
                    st = (self.scratch / rel).stat()
                records.append((st.st_mtime_ns, rel, st, body))
            payload_now = self.local_files(payload=True)
            payload = [rel for rel, st in sorted(payload_now.items(), key=lambda x: x[1].st_mtime_ns)]
            payload = [rel for rel in payload if not self._same(rel, payload_now[rel])]
            gone = [rel for rel in sorted(self.known) if rel not in present_records and rel not in payload_now]
            for rel in gone:
                if not PAYLOAD.search(rel):
                    self._check_lease()
                    self._delete(rel)
            sent: list[tuple[str, os.stat_result, str | None]] = []
            held_back = False
            if payload:
                self._check_lease()
                with ThreadPoolExecutor(UPLOAD_WORKERS) as pool:
                    done = list(pool.map(self._upload_file, payload))
                held_back = any(d is None for d in done)
                sent += [d for d in done if d is not None]
            if not held_back:
                for _, rel, st, body in sorted(records, key=lambda r: r[0]):
                    self._check_lease()
                    got = self._upload_record(rel, st, body)
                    if got is not None:
                        sent.append(got)
            if sent:
                with ThreadPoolExecutor(UPLOAD_WORKERS) as pool:
                    tags = list(pool.map(lambda item: self._remote_etag(item[0], item[2]), sent))
                for (rel, st, _), etag in zip(sent, tags, strict=True):
                    self.known[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "etag": etag}
                    self.bytes_up += st.st_size
                    if LAZY.search(rel):
                        self._lazy_at[rel] = now
            for rel in gone:
                if PAYLOAD.search(rel) and not (self.scratch / rel).exists():
                    self._check_lease()
                    self._delete(rel)
            self._save_marker()
            return len(sent)

    def _same(self, rel: str, st: os.stat_result) -> bool:
        """Whether `rel` is as last pulled or pushed (size, mtime and inode: an atomic rewrite
        within one clock tick still gets a new inode)."""
        was = self.known.get(rel)
        return (
            was is not None
            and was.get("size") == st.st_size
            and was.get("mtime_ns") == st.st_mtime_ns
            and was.get("ino", st.st_ino) == st.st_ino
        )

    def _check_lease(self) -> None:
        """A run dir whose lease was lost (taken over, unrenewable) is not written any more."""
        if self.lease is not None:
            self.lease.check()

    def _delete(self, rel: str) -> None:
        remote = join(self.root, rel)
        with contextlib.suppress(FileNotFoundError):
            retrying(self.url, f"delete {rel}", lambda: self.fs.rm_file(remote), (FileNotFoundError,))
        self.known.pop(rel, None)

    def _upload_file(self, rel: str) -> tuple[str, os.stat_result, str | None] | None:
        """Upload a payload file as it is now: (rel, its stat, its ETag if the store said it), or
        None when it changed or went while it went up (then the next push takes it)."""
        path = self.scratch / rel
        try:
            before = path.stat()
            body = path.read_bytes() if before.st_size <= WHOLE_PUT_BYTES else None
        except FileNotFoundError:
            return None
        etag = self._put(rel, path, body)
        try:
            after = path.stat()
        except FileNotFoundError:
            return None
        if (after.st_size, after.st_mtime_ns, after.st_ino) != (before.st_size, before.st_mtime_ns, before.st_ino):
            return None
        return rel, after, etag

    def _upload_record(
        self, rel: str, st: os.stat_result, body: bytes | None
    ) -> tuple[str, os.stat_result, str | None] | None:
        """Upload a record's snapshot (or, for a large one, the file as it is now)."""
        path = self.scratch / rel
        if body is None and not path.exists():
            return None
        return rel, st, self._put(rel, path, body)

    def _put(self, rel: str, path: Path, body: bytes | None) -> str | None:
        """One object: from memory in one request (its answer carries the ETag), or streamed
        from disk for a large file (multipart where the store has it: bounded memory)."""
        remote = join(self.root, rel)
        if body is not None:
            answer = retrying(self.url, f"write {rel}", lambda: self.fs.pipe_file(remote, body))
            return _etag(answer) if isinstance(answer, dict) else None
        retrying(self.url, f"write {rel}", lambda: self.fs.put_file(str(path), remote))
        return None

    def _remote_etag(self, rel: str, etag: str | None) -> str:
        if etag is not None:
            return etag
        try:
            return _etag(self.fs.info(join(self.root, rel)))
        except Exception:  # an etag only spares a later pull a download
            return ""

    # ---- the background pusher
    def start(self) -> None:
        """Push in the background: woken by every committed file, at least every sync_every_s."""
        _active.add(self)
        self._thread = threading.Thread(target=self._loop, name="forge-push", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure
        self._check_lease()

    def _loop(self) -> None:
        every = settings().sync_every_s
        while not self._stop.is_set():
            self._wake.wait(every)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.push()
            except StorageError as exc:
                self._failure = exc
                log.error("%s", exc)
                return
            except Exception as exc:  # a bug or a local error: reported as the store's failure
                self._failure = StorageError(f"{self.url}: cannot write: {first_line(exc)}")
                log.error("%s", self._failure)
                return
            self._stop.wait(MIN_ROUND_GAP_S)

    def close(self, final: bool = True) -> None:
        """Stop the pusher; with final, push everything left (raises the store's error)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        _active.discard(self)
        if final:
            self.push(final=True)


# ---- the request cache's segments
def _segment_dir(db: Path) -> Path:
    return db.with_name(db.stem + SEGMENTS)


def export_cache_segments(scratch: Path) -> int:
    """Answers added to each local request cache since the last export, as one new segment
    file beside it; returns the answers exported."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from forge.io.secrets import redact_table

    total = 0
    for db in sorted((scratch / "cache").glob("*.sqlite")) if (scratch / "cache").is_dir() else []:
        try:
            with contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
                con.execute("CREATE TABLE IF NOT EXISTS forge_sync (name TEXT PRIMARY KEY, value INTEGER)")
                row = con.execute("SELECT value FROM forge_sync WHERE name = 'exported'").fetchone()
                done = row[0] if row else 0
                if not con.execute("SELECT name FROM sqlite_master WHERE name = 'answers'").fetchone():
                    continue
                rows = con.execute(
                    "SELECT rowid, key, value FROM answers WHERE rowid > ? ORDER BY rowid", (done,)
                ).fetchall()
                if not rows:
                    continue
                seg = _segment_dir(db)
                seg.mkdir(exist_ok=True)
                name = f"{time.time_ns():020d}-{os.getpid()}-{rows[0][0]}-{rows[-1][0]}.parquet"
                # the one masking path of every file forge writes: no secret reaches the store
                table = redact_table(pa.table({"key": [r[1] for r in rows], "value": [r[2] for r in rows]}))
                tmp = seg / f".{name}.tmp-{os.getpid()}"
                pq.write_table(table, tmp, compression="zstd")
                os.replace(tmp, seg / name)
                con.execute("CREATE TABLE IF NOT EXISTS forge_segments (name TEXT PRIMARY KEY)")
                con.execute("INSERT OR IGNORE INTO forge_segments VALUES (?)", (name,))
                con.execute("INSERT OR REPLACE INTO forge_sync VALUES ('exported', ?)", (rows[-1][0],))
                con.commit()
                total += len(rows)
        except sqlite3.DatabaseError as exc:  # a damaged cache is the run's to report (check_cache)
            log.warning("%s: answers not exported this time (%s)", db, exc)
    return total


def load_cache_segments(scratch: Path) -> int:
    """Load the segments pulled from the remote dir into the local request caches (each once);
    returns the answers added."""

    added = 0
    cache = scratch / "cache"
    if not cache.is_dir():
        return 0
    for seg in sorted(cache.glob("*" + SEGMENTS)):
        db = seg.with_name(seg.name[: -len(SEGMENTS)] + ".sqlite")
        try:
            added += _load_segments(seg, db)
        except (sqlite3.DatabaseError, OSError, ValueError) as exc:
            # a damaged local cache is the run's to move aside (check_cache); the segments stay
            # in the store for the next pull
            log.warning("%s: answers from the store not loaded (%s)", db, exc)
    return added


def _load_segments(seg: Path, db: Path) -> int:
    """The segments of one cache not loaded yet, into it; returns the answers added."""
    import pyarrow.parquet as pq

    added = 0
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        con.execute("CREATE TABLE IF NOT EXISTS forge_segments (name TEXT PRIMARY KEY)")
        con.execute("CREATE TABLE IF NOT EXISTS forge_sync (name TEXT PRIMARY KEY, value INTEGER)")
        loaded = {r[0] for r in con.execute("SELECT name FROM forge_segments")}
        top_before = con.execute("SELECT max(rowid) FROM answers").fetchone()[0] or 0
        row = con.execute("SELECT value FROM forge_sync WHERE name = 'exported'").fetchone()
        exported = row[0] if row else 0
        for path in sorted(seg.glob("*.parquet")):
            if path.name in loaded:
                continue
            table = pq.read_table(path)
            before = con.total_changes
            con.executemany(
                "INSERT OR IGNORE INTO answers VALUES (?, ?)",
                zip(table.column("key").to_pylist(), table.column("value").to_pylist(), strict=True),
            )
            added += con.total_changes - before
            con.execute("INSERT INTO forge_segments VALUES (?)", (path.name,))
        top = con.execute("SELECT max(rowid) FROM answers").fetchone()[0] or 0
        if exported >= top_before and top > exported:  # what was loaded is not exported again
            con.execute("INSERT OR REPLACE INTO forge_sync VALUES ('exported', ?)", (top,))
        con.commit()
    return added
