"""Drives rollouts: up to `max_active` samples run their function at once (each holds an engine
slot only while one of its requests is in flight), and what each returns is written as one
group of rows — or, when it fails, one quarantined row naming the stage, the step it reached
and why. Only an engine, cache or disk failure stops the task; a user's bug never does."""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge.run.output import ChunkWriter, write_atomic
from forge.stages.generate.generator import Reject, dump_prompt, run_pool
from forge.stages.generate.prompt import RowRejected
from forge.stages.generate.rollout.calls import Calls, Generate, StepFailed
from forge.stages.generate.rollout.columns import RESERVED, ColumnPin

# the rollout being run by the current asyncio task (ctx.messages records a truncated prompt on it)
CURRENT: ContextVar[Generate | None] = ContextVar("forge_rollout", default=None)


@dataclass
class RolloutItem:
    key: str  # the row id
    sample: int  # which of generation.rollouts
    row: dict[str, Any]
    where: str
    metadata: str | None


class RolloutWriter(ChunkWriter):
    """data/ shards whose schema is the run's pinned columns at the time each shard is written."""

    def __init__(self, directory: Path, task: int, columns: ColumnPin, rows_per_chunk: int) -> None:
        super().__init__(directory, task, columns.schema(), rows_per_chunk)
        self.columns = columns
        self._version = columns.version

    async def add_group(self, rows: list[dict[str, Any]]) -> None:
        if self._version != self.columns.version:  # a new column: the schema is rebuilt here, on
            self._version = self.columns.version  # the loop; a shard's thread reads this snapshot
            self.schema = self.columns.schema()
        await super().add_group(rows)

    def _write(self, path: Path, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa

        write_atomic(path, pa.Table.from_pylist(rows, schema=self.schema))


def user_frame(exc: BaseException) -> str:
    """`file.py:42 in fn`: the innermost frame outside forge and asyncio, where the bug is."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if "/forge/" not in f.filename and "/asyncio/" not in f.filename]
    f = (mine or frames or [None])[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}" if f else "?"


class SampleTimedOut(Exception):
    """A sample ran past rollout.timeout_s (raised by forge, not by the user's fn); the message
    says where it was when the limit struck."""


def timed_out(limit: float, gen: Generate) -> str:
    """The quarantine reason of a sample past rollout.timeout_s, taken before it is cancelled."""
    if gen.waiting:
        where = f"in {gen.where()}, waiting for the engine"
    elif gen.steps:
        where = f"in {gen.where()}, after its answer (in the rollout's own code)"
    else:
        where = "before the first generate call (in the rollout's own code)"
    return f"timed out after rollout.timeout_s={limit:g} s {where}; cancelled"


class RolloutDriver:
    def __init__(
        self,
        fn: Any,
        fn_name: str,
        ctx: Any,
        calls: Calls,
        data: RolloutWriter,
        rejected: ChunkWriter,
        row_fields: dict[str, Any],
        on_row_done: Any,
    ) -> None:
        self.fn = fn
        self.fn_name = fn_name
        self.ctx = ctx
        self.calls = calls
        self.data = data
        self.rejected = rejected
        self.row_fields = row_fields
        self.on_row_done = on_row_done
        self.stats = calls.stats

    async def run(self, plan: Iterable[RolloutItem | Reject], max_active: int) -> None:
        queue: asyncio.Queue[RolloutItem | None] = asyncio.Queue(maxsize=max_active)
        workers = [self._worker(queue) for _ in range(max_active)]
        await run_pool(self._feed(plan, queue, len(workers)), workers)

    async def _feed(self, plan: Iterable[RolloutItem | Reject], queue: asyncio.Queue, n_workers: int) -> None:
        for item in plan:
            if isinstance(item, Reject):
                await self._reject(item)
            else:
                await queue.put(item)
        for _ in range(n_workers):
            await queue.put(None)

    async def _worker(self, queue: asyncio.Queue) -> None:
        while (item := await queue.get()) is not None:
            await self._run_one(item)

    async def _run_one(self, item: RolloutItem) -> None:
        gen = Generate(self.calls, item.sample)
        CURRENT.set(gen)  # each worker is its own asyncio task, so this is this rollout's
        try:
            result = await self._call(item, gen)
        except SampleTimedOut as exc:
            if self.calls.fatal is not None:  # the engine died while the sample was cancelled
                raise self.calls.fatal from None
            await self._fail(item, "rollout", str(exc), True, gen)  # retryable: a larger limit, a re-run
            return
        except Exception as exc:
            if self.calls.fatal is not None:  # the engine, cache or disk: stop, whatever fn did
                raise self.calls.fatal from None
            await self._failed(item, gen, exc)
            return
        if self.calls.fatal is not None:  # fn swallowed it: its row must not count as done
            raise self.calls.fatal
        rows, problem = self._rows(item, gen, result)
        if problem is not None:
            await self._fail(item, "rollout", problem, "no rows" not in problem, gen)
            return
        await self.data.add_group(rows)
        self.on_row_done(item.key)

    async def _call(self, item: RolloutItem, gen: Generate) -> Any:
        """The user's fn on one sample, within rollout.timeout_s: past it, the sample is cancelled
        (its in-flight requests with it; the answers of its finished steps stay in the cache).
        Time spent waiting for a free engine slot is not counted: while other samples' requests
        (hung ones included) hold every slot, a healthy sample is parked, not slow."""
        limit = self.ctx.cfg.timeout_s
        if limit is None:
            return await self.fn(item.row, gen, self.ctx)
        sample = asyncio.ensure_future(self.fn(item.row, gen, self.ctx))  # copies CURRENT's context
        start = time.monotonic()
        try:
            while (left := start + limit + gen.parked_for() - time.monotonic()) > 0:
                done, _ = await asyncio.wait({sample}, timeout=left)
                if done:
                    return sample.result()
            if sample.done():  # finished right at the limit
                return sample.result()
            reason = timed_out(limit, gen)
            sample.cancel()
            while not (await asyncio.wait({sample}, timeout=1.0))[0]:
                sample.cancel()  # its code swallowed the cancellation (a bare except): again, until it ends
            if not sample.cancelled():
                sample.exception()  # retrieved: what it raised on the way out is not logged as lost
            raise SampleTimedOut(reason)
        finally:
            if not sample.done():  # this worker was cancelled (Ctrl-C, a fatal error): so is the sample
                sample.cancel()

    async def _failed(self, item: RolloutItem, gen: Generate, exc: Exception) -> None:
        """Quarantine a rollout that raised: forge's own failures by stage, anything else as the user's."""
        if isinstance(exc, StepFailed):
            await self._fail(item, exc.stage, f"{gen.where()}: {exc.reason}", exc.retryable, gen, exc.answer)
        elif isinstance(exc, RowRejected):
            await self._fail(item, "prompt", f"{item.where}: {exc}", False, gen)
        else:  # the user's code: quarantine the row (retryable: fix the code, re-run), keep going
            reason = f"{type(exc).__name__}: {exc} (raised at {user_frame(exc)}, {gen.where()})"
            await self._fail(item, "rollout", reason, True, gen)

    def _rows(self, item: RolloutItem, gen: Generate, result: Any) -> tuple[list[dict[str, Any]], str | None]:
        outs = [result] if isinstance(result, dict) else result
        if not isinstance(outs, list) or not all(isinstance(d, dict) for d in outs):
            return [], f"{self.fn_name} returned {type(result).__name__}; return a dict of columns or a list of dicts"
        if not outs:
            return [], f"{self.fn_name} returned no rows (an empty list): nothing of this sample is kept"
        keep = {
            "requests": gen.requests,
            "finish_reason": gen.finish_reason,
            "length_stopped": gen.length_stopped,
            "truncated": gen.truncated,
            "content_null": gen.content_null,
            "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": gen.completion_tokens,
            "cached_tokens": gen.cached_tokens,
            "cost_usd": gen.cost_usd,
            "metadata": item.metadata,
            **self.row_fields,
        }
        rows = []
        for i, out in enumerate(outs):
            if i == 1:  # the sample's requests and tokens are counted once, on its first row
                keep.update(requests=0, prompt_tokens=0, completion_tokens=0, cached_tokens=0)
                keep.update(cost_usd=0.0 if gen.cost_usd is not None else None)
            clash = next((k for k in out if k in RESERVED or not isinstance(k, str)), None)
            if clash is not None:
                return (
                    [],
                    f"{self.fn_name} returned the column {clash!r}, which forge writes itself "
                    "(id, rollout, output_index)",
                )
            row = {"id": item.key, "rollout": item.sample, "output_index": i, **out}
            for name, value in keep.items():
                row.setdefault(name, value)
            problem = self.data.columns.conform(row)
            if problem is not None:
                return [], f"output row {i}: {problem}"
            rows.append(row)
        return rows, None

    async def _fail(
        self, item: RolloutItem, stage: str, reason: str, retryable: bool, gen: Generate, answer: str | None = None
    ) -> None:
        r = Reject(item.key, item.sample, stage, reason, retryable, item.where, dump_prompt(item.row))
        await self._reject(r, gen.where(), answer)

    async def _reject(self, r: Reject, step: str | None = None, answer: str | None = None) -> None:
        self.stats.rejected[r.stage] += 1
        row = r.row()
        row["step"] = step
        row["answer"] = None if answer is None else answer[:10_000].encode("utf-8", "backslashreplace").decode()
        await self.rejected.add(row)
        self.on_row_done(r.id, r.rollout < 0)
