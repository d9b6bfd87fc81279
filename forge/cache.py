"""The request cache: every answer is committed to sqlite before its row counts as done, so a
killed run replays answers instead of re-sending requests.

The key hashes everything that shapes an answer: the rendered messages, every sampling
parameter (defaults included), model, revision, engine and rollout index. A changed model or
parameter therefore never replays a stale answer. Writes are group-committed: concurrent
answers share one transaction, and each caller resumes once its answer is on disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiosqlite
import orjson
import xxhash


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
        await self.db.execute("PRAGMA journal_mode=WAL")
        await self.db.execute("PRAGMA synchronous=NORMAL")
        await self.db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        await self.db.commit()
        self._writer = asyncio.create_task(self._write_loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        self._wake.set()
        if self._writer:
            await self._writer
        if self.db:
            await self.db.close()

    async def get_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        keys = list(keys)
        found: dict[str, dict[str, Any]] = {}
        assert self.db is not None
        for start in range(0, len(keys), 500):
            part = keys[start : start + 500]
            marks = ",".join("?" * len(part))
            async with self.db.execute(f"SELECT key, value FROM answers WHERE key IN ({marks})", part) as cur:
                async for key, value in cur:
                    found[key] = orjson.loads(value)
        return found

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
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    raise
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
            if self._closing and not self._pending:
                return

    async def count(self) -> int:
        assert self.db is not None
        async with self.db.execute("SELECT COUNT(*) FROM answers") as cur:
            row = await cur.fetchone()
        return int(row[0])
