"""The request cache: every answer is committed to sqlite before its row counts as done, so a
killed run replays answers instead of re-sending requests.

The key hashes everything that shapes an answer: the rendered messages, every sampling
parameter (defaults included), model, revision, engine and rollout index. A changed model or
parameter therefore never replays a stale answer. Writes are group-committed: concurrent
answers share one transaction, and each caller resumes once its answer is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiosqlite
import orjson
import xxhash

from forge.run.output import NamedWriteError

log = logging.getLogger("forge.stages.generate.cache")
SIDE_FILES = ("-wal", "-shm", "-journal")
FULL_CHECK_BYTES = 256 << 20
DAMAGED = re.compile(r"not a database|malformed|no such table|no such column|corrupt", re.I)


class CacheWriteError(NamedWriteError):
    """The cache could not be written (disk full, read-only): the message names the file."""


def _suspect_marker(path: Path) -> Path:
    return path.with_name(path.name + ".suspect")


def check_cache(path: Path) -> Path | None:
    """Check a request cache before any engine starts. A damaged one (overwritten header, torn
    pages, not a database) is moved aside with its -wal/-shm files and its path returned: the run
    goes on without it (rows in shards count as done; only the missing ones are generated again).

    A cache up to FULL_CHECK_BYTES (or one a run found damaged mid-way) gets sqlite's quick_check;
    a larger one its header, schema and first and last rows, so a resume never spends minutes here.
    """
    if not path.exists():
        return None
    marker = _suspect_marker(path)
    full = marker.exists() or path.stat().st_size <= FULL_CHECK_BYTES
    problem = None
    try:
        # read-write, as the run will open it (the shard lock keeps other writers out)
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
            result = db.execute("PRAGMA quick_check").fetchone() if full else ("ok",)
            if not result or result[0] != "ok":
                problem = f"quick_check says {result[0] if result else 'nothing'}"
            else:
                db.execute("SELECT key, value FROM answers ORDER BY rowid LIMIT 1").fetchall()
                db.execute("SELECT key, value FROM answers ORDER BY rowid DESC LIMIT 1").fetchall()
    except sqlite3.DatabaseError as exc:
        if not DAMAGED.search(str(exc)):  # locked, unreadable, disk I/O: not the file's fault
            raise CacheWriteError(f"{path}: cannot open the request cache: {exc}") from None
        problem = str(exc)
    if problem is None:
        marker.unlink(missing_ok=True)
        return None
    marker.unlink(missing_ok=True)
    dest = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    path.replace(dest)
    for suffix in SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.replace(dest.with_name(dest.name + suffix))
    log.warning(
        "request cache %s is damaged (%s); moved it to %s and going on without it: rows already in "
        "shards count as done, the missing ones are generated again",
        path,
        problem,
        dest,
    )
    return dest


def request_key(body: dict[str, Any], identity: dict[str, Any], rollout: int) -> str:
    """Hash of the request body (messages + all params) + model identity + rollout index."""
    blob = orjson.dumps({"body": body, "identity": identity, "rollout": rollout}, option=orjson.OPT_SORT_KEYS)
    return xxhash.xxh3_128_hexdigest(blob)


class RequestCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.db: aiosqlite.Connection | None = None
        self._pending: list[tuple[str, str, asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task | None = None
        self._closing = False

    async def __aenter__(self) -> RequestCache:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = await aiosqlite.connect(self.path)
        try:
            await self.db.execute("PRAGMA journal_mode=WAL")
            await self.db.execute("PRAGMA synchronous=NORMAL")
            await self.db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            await self.db.commit()
        except sqlite3.Error as exc:
            # close, or aiosqlite's worker thread keeps the process alive after the error
            await self.db.close()
            self.db = None
            raise self._failed("open", exc) from None
        self._writer = asyncio.create_task(self._write_loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        self._wake.set()
        try:
            if self._writer:  # a write error already reached every caller waiting on it
                await asyncio.gather(self._writer, return_exceptions=True)
        finally:
            if self.db:  # always: aiosqlite's thread would keep the process alive
                with contextlib.suppress(sqlite3.Error):
                    await self.db.close()
                self.db = None

    async def get_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        keys = list(keys)
        found: dict[str, dict[str, Any]] = {}
        assert self.db is not None
        for start in range(0, len(keys), 500):
            part = keys[start : start + 500]
            marks = ",".join("?" * len(part))
            try:
                async with self.db.execute(f"SELECT key, value FROM answers WHERE key IN ({marks})", part) as cur:
                    async for key, value in cur:
                        found[key] = orjson.loads(value)
            except sqlite3.DatabaseError as exc:
                raise self._failed("read", exc) from None
        return found

    def _failed(self, what: str, exc: sqlite3.Error) -> CacheWriteError:
        """One line for a cache that fails mid-run; a damaged one is checked in full next time
        (and moved aside), so the same command goes on."""
        if DAMAGED.search(str(exc)):
            with contextlib.suppress(OSError):
                _suspect_marker(self.path).touch()
            return CacheWriteError(
                f"{self.path}: the request cache is damaged ({exc}); re-run the same command: it is checked "
                "and moved aside, and the rows not in shards are generated again"
            )
        if "full" in str(exc):  # sqlite's words for ENOSPC
            return CacheWriteError(f"cannot write {self.path}: No space left on device ({exc})")
        return CacheWriteError(f"{self.path}: cannot {what} the request cache: {exc}")

    async def put(self, key: str, value: dict[str, Any]) -> None:
        """Returns once the answer is committed."""
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((key, orjson.dumps(value).decode(), fut))
        self._wake.set()
        await fut

    async def _write_loop(self) -> None:
        assert self.db is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if batch:
                try:
                    await self.db.executemany(
                        "INSERT OR REPLACE INTO answers (key, value) VALUES (?, ?)", [(k, v) for k, v, _ in batch]
                    )
                    await self.db.commit()
                except Exception as exc:  # surface to every waiter, then stop
                    if isinstance(exc, sqlite3.Error):
                        exc = self._failed("write", exc)
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    raise exc from None
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
            if self._closing and not self._pending:
                return

    async def any(self) -> bool:
        """Whether any answer is cached (cheap, unlike count() on a big cache)."""
        assert self.db is not None
        async with self.db.execute("SELECT 1 FROM answers LIMIT 1") as cur:
            return await cur.fetchone() is not None

    async def count(self) -> int:
        assert self.db is not None
        async with self.db.execute("SELECT COUNT(*) FROM answers") as cur:
            row = await cur.fetchone()
        return int(row[0])
