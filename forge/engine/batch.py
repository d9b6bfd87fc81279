"""Provider batch APIs (`model=openai_batch`): the OpenAI Batch API's files + batches endpoints,
which `vllm run-batch`'s JSONL format matches, at about half the online price.

The generation step is unchanged: it calls `complete(body, key)` per request as for any engine,
with as many in flight as one batch holds. Here requests are gathered into batches (a batch is
sent when `model.batch_size` requests wait, or when none has come for a moment), each written as
JSONL, uploaded, submitted and polled with backoff; answers are matched back by custom id (the
request's cache key) and handed to the waiting requests, which the request cache then keeps.

Resumable: each submitted batch's id and custom ids are in `state/batches.json` before anything
waits on it, and a finished batch's results are kept in `state/batch_results/`. A re-run days
later polls the batches it left instead of submitting them again, and serves their answers.
A request that failed in a batch (5xx, or not done when the batch expired or failed) goes into
a later batch, up to run.max_retries times; one the provider refused (4xx) is the row's fault
and is quarantined like an online refusal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from forge.engine.client import Completion, RequestFailed, RequestRejected, error_message, parse_completion
from forge.engine.config import EngineKind
from forge.engine.server import Endpoint, EngineError
from forge.run.output import write_json_atomic

log = logging.getLogger("forge.engine.batch")
CHAT = "/v1/chat/completions"
DONE = ("completed", "expired", "failed", "cancelled")
MAX_BYTES = 190 * 1024 * 1024  # OpenAI's limit is 200 MB per input file
GATHER_S = 2.0  # a batch goes out once no request has come for this long


def _write_whole(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class BatchEndpoint(Endpoint):
    """The provider's API base URL and key (model.endpoint_url, model.api_key_env)."""

    kind = EngineKind.openai_batch


class BatchClient:
    """The OpenAI Batch API. Another provider's batches override headers(), max_bytes, _create,
    _poll and _results (forge/engine/anthropic_batch.py)."""

    max_bytes = MAX_BYTES

    def __init__(self, engine: Endpoint, state_dir: Path, size: int, poll_s: float, window: str, retries: int) -> None:
        self.engine = engine
        self.state_path = state_dir / "batches.json"
        self.results_dir = state_dir / "batch_results"
        self.size = size
        self.poll_s = poll_s
        self.window = window
        self.retries = retries
        self.session: aiohttp.ClientSession | None = None
        self.batches: dict[str, dict[str, Any]] = {}  # open batches: id -> {ids, file, submitted, status}
        self.results: dict[str, dict[str, Any]] = {}  # custom id -> its result line, from finished batches
        self.waiting: dict[str, asyncio.Future] = {}
        self.queue: dict[str, bytes] = {}  # custom id -> request body, not yet in a batch
        self.bodies: dict[str, bytes] = {}  # custom id -> request body, until answered (to resend it)
        self.attempts: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self.submitted = 0

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> BatchClient:
        self.session = aiohttp.ClientSession(headers=self.headers(), timeout=aiohttp.ClientTimeout(total=600))
        if self.state_path.exists():
            self.batches = json.loads(self.state_path.read_text()).get("batches", {})
        for path in sorted(self.results_dir.glob("*.jsonl")) if self.results_dir.is_dir() else []:
            self._take_results(path.read_bytes())
        for batch_id in list(self.batches):
            log.info("batch %s: submitted by an earlier session; polling it, not sending it again", batch_id)
            self._spawn(self._watch(batch_id))
        return self

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.engine.api_key}"} if self.engine.api_key else {}

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        if self._timer is not None:
            self._timer.cancel()
        if self.session is not None:
            await self.session.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()  # the provider or the state file failed: every waiting request learns it
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, EngineError) else EngineError(f"batch: {exc}"))

    # --- requests ----------------------------------------------------------------------------

    async def complete(self, body: dict[str, Any], key: str | None = None, priority: int = 0) -> Completion:
        cid = key or orjson.dumps(body).hex()[:64]
        if cid in self.results:
            return self._answer(cid, self.results[cid])
        fut = self.waiting.get(cid)
        if fut is None or fut.done():
            fut = asyncio.get_running_loop().create_future()
            self.waiting[cid] = fut
            self.bodies[cid] = orjson.dumps(body)
            if not any(cid in b["ids"] for b in self.batches.values()):
                self.queue[cid] = self.bodies[cid]
                self._schedule()
        try:
            return await fut
        finally:
            self.bodies.pop(cid, None)

    def _answer(self, cid: str, line: dict[str, Any]) -> Completion:
        response = line.get("response") or {}
        status = int(response.get("status_code") or 0)
        body = response.get("body")
        if status == 200 and isinstance(body, dict):
            try:
                return parse_completion(body)
            except (KeyError, IndexError, TypeError, ValueError):
                raise RequestFailed(f"batch: malformed answer for {cid}: {str(body)[:200]}") from None
        why = line.get("error") or body
        message = error_message(json.dumps(why)) if why is not None else "no answer"
        if 400 <= status < 500:
            raise RequestRejected(status, message)
        raise RequestFailed(f"batch: HTTP {status or '-'}: {message}")

    def _schedule(self) -> None:
        if len(self.queue) >= self.size:
            self._flush()
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(GATHER_S, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.queue:
            ids, size = [], 0
            for cid, raw in self.queue.items():
                if len(ids) >= self.size or size + len(raw) > self.max_bytes:
                    break
                ids.append(cid)
                size += len(raw) + 100
            self._spawn(self._submit(ids, [self.queue.pop(cid) for cid in ids]))

    @staticmethod
    def _line(cid: str, raw: bytes) -> bytes:
        return b'{"custom_id":%s,"method":"POST","url":"%s","body":%s}' % (orjson.dumps(cid), CHAT.encode(), raw)

    # --- the provider ------------------------------------------------------------------------

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        """The provider's API (a path, or a whole URL such as Anthropic's results_url), retried on
        5xx/429/connection errors; JSON back, or the bytes of a download (`raw=True`)."""
        assert self.session is not None
        raw_wanted = kw.pop("raw", path.endswith("/content"))
        url = path if path.startswith("http") else f"{self.engine.base_url}{path}"
        for attempt in range(6):
            try:
                async with self.session.request(method, url, **kw) as resp:
                    raw = await resp.read()
                    if resp.status == 200:
                        return raw if raw_wanted else orjson.loads(raw)
                    if resp.status in (401, 403):
                        raise EngineError(f"{self.engine.base_url} refused the API key (HTTP {resp.status})")
                    if resp.status < 500 and resp.status != 429:
                        why = error_message(raw.decode(errors="replace"))
                        raise EngineError(f"batch API: {method} {path}: HTTP {resp.status}: {why}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                log.warning("batch API: %s %s: %s (attempt %d)", method, path, exc, attempt + 1)
            await asyncio.sleep(min(2**attempt, 60))
        raise EngineError(f"batch API: {method} {path} kept failing; re-run the same command to resume")

    async def _create(self, ids: list[str], bodies: list[bytes]) -> str:
        """Upload the requests as JSONL and submit them: the batch id."""
        jsonl = b"".join(self._line(cid, raw) + b"\n" for cid, raw in zip(ids, bodies, strict=True))
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", jsonl, filename="forge-batch.jsonl", content_type="application/jsonl")
        uploaded = await self._call("POST", "/v1/files", data=form)
        created = await self._call(
            "POST",
            "/v1/batches",
            json={"input_file_id": uploaded["id"], "endpoint": CHAT, "completion_window": self.window},
        )
        return created["id"]

    async def _poll(self, batch_id: str) -> tuple[str, bool, dict[str, Any]]:
        """(status, ended, what the provider said)."""
        info = await self._call("GET", f"/v1/batches/{batch_id}")
        status = info.get("status", "?")
        return status, status in DONE, info

    async def _results(self, info: dict[str, Any]) -> bytes:
        """The ended batch's result lines, OpenAI's shape: {custom_id, response: {status_code, body}}."""
        got = b""
        for name in ("output_file_id", "error_file_id"):
            if info.get(name):
                got += await self._call("GET", f"/v1/files/{info[name]}/content")
        return got

    async def _submit(self, ids: list[str], bodies: list[bytes]) -> None:
        batch_id = await self._create(ids, bodies)
        for cid in ids:
            self.attempts[cid] = self.attempts.get(cid, 0) + 1
        self.batches[batch_id] = {"ids": ids, "submitted": time.time(), "status": "submitted"}
        self._save()  # before anything waits on it: a kill from here on resumes by polling
        self.submitted += 1
        log.info("batch %s: %d requests submitted", batch_id, len(ids))
        await self._watch(batch_id)

    async def _watch(self, batch_id: str) -> None:
        """Poll with backoff until the batch ends; then hand out its answers and resubmit the rest."""
        delay = self.poll_s
        while True:
            status, ended, info = await self._poll(batch_id)
            if status != self.batches[batch_id].get("status"):
                counts = info.get("request_counts") or {}
                log.info("batch %s: %s %s", batch_id, status, json.dumps(counts) if counts else "")
                self.batches[batch_id]["status"] = status
                self._save()
            if ended:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 600.0)
        got = await self._results(info)
        self.results_dir.mkdir(parents=True, exist_ok=True)
        # whole or not at all (a kill mid-write must not leave a cut file for the next session to
        # read), and off the loop: a batch's results run to hundreds of MB
        await asyncio.to_thread(_write_whole, self.results_dir / f"{batch_id}.jsonl", got)
        ids = self.batches.pop(batch_id)["ids"]
        self._save()
        self._take_results(got)
        again = []
        for cid in ids:
            line = self.results.get(cid)
            retry = line is None or int((line.get("response") or {}).get("status_code") or 0) >= 500
            if retry and self.attempts.get(cid, 1) <= self.retries and cid in self.waiting:
                self.results.pop(cid, None)
                again.append(cid)
            elif cid in self.waiting and not self.waiting[cid].done():
                fut = self.waiting.pop(cid)
                try:
                    fut.set_result(self._answer(cid, line or {"error": {"message": f"batch {batch_id} {status}"}}))
                except (RequestRejected, RequestFailed) as exc:
                    fut.set_exception(exc)
        if again:
            log.info("batch %s: %d requests not answered (%s): into the next batch", batch_id, len(again), status)
            self._requeue(again)

    def _requeue(self, again: list[str]) -> None:
        for cid in again:
            if cid in self.bodies:
                self.queue[cid] = self.bodies[cid]
            else:  # its body is gone with the state of an earlier session: the row is re-planned
                fut = self.waiting.pop(cid)
                fut.set_exception(RequestFailed("batch: not answered, and its request is not at hand to resend"))
        if self.queue:
            self._schedule()

    def _take_results(self, raw: bytes) -> None:
        for line in raw.splitlines():
            if line.strip():
                item = orjson.loads(line)
                self.results[item["custom_id"]] = item

    def _save(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.state_path, {"batches": self.batches})

    def notes(self) -> dict[str, Any]:
        return {"batches_submitted": self.submitted, "batches_open": len(self.batches)}
