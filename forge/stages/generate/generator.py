"""The generation step: rows -> requests -> answers -> rows, with at most run.max_in_flight
requests in flight. Config: conf/config.yaml `generation:` and `run:`.

Order of durability: an answer is committed to the request cache before its row is buffered
for a shard, so a kill at any moment loses nothing and a re-run replays instead of re-sending.
Cache lookups are batched (one query per few hundred rows); shard writes and sqlite commits run
off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from forge.engine import ChatClient, EngineError, RequestFailed, RequestRejected
from forge.engine.client import Completion
from forge.engine.pricing import Prices
from forge.run.batch import batched
from forge.run.output import ChunkWriter
from forge.stages.generate.cache import RequestCache
from forge.stages.generate.config import GenerationConfig

log = logging.getLogger("forge.stages.generate.generator")
LOOKUP_BATCH = 256
# this many requests failing in a row (retries used up, none answered between) means the engine
# is gone, not that rows are bad: stop rather than quarantine every row left
FAILED_IN_A_ROW = 16


@dataclass
class WorkItem:
    key: str  # the row id
    rollout: int
    body: dict[str, Any]
    cache_key: str
    truncated: bool
    metadata: str | None


@dataclass
class Reject:
    id: str  # the row id, or @file:line when the row has no usable id
    rollout: int
    stage: str
    reason: str
    retryable: bool = False
    source: str = ""
    prompt: str = ""

    def row(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class SessionStats:
    """What happened in this invocation (totals over all sessions come from the shards)."""

    requests_sent: int = 0
    answers: int = 0
    cache_hits: int = 0
    retries: int = 0
    retry_reasons: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0  # of prompt_tokens, served from the engine's prefix cache
    completion_tokens: int = 0
    cost_usd: float = 0.0  # what this session's answers cost (replays from the cache not counted)
    truncated: int = 0
    content_null: int = 0
    finish_reasons: Counter = field(default_factory=Counter)
    first_send: float | None = None
    last_answer: float | None = None

    def on_retry(self, reason: str) -> None:
        self.retries += 1
        self.retry_reasons[reason.split(":")[0]] += 1


def request_body(messages: list[dict[str, str]], model: str, gen: GenerationConfig, rollout: int) -> dict[str, Any]:
    """The chat request. Unset sampling params are left to the engine (and still keyed as null)."""
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": gen.max_tokens}
    for name in ("temperature", "top_p", "top_k", "stop"):
        value = getattr(gen, name)
        if value is not None:
            body[name] = list(value) if name == "stop" else value
    if gen.seed is not None:
        body["seed"] = gen.seed + rollout  # distinct samples per rollout, reproducible per run
    body.update(gen.extra_body)
    return body


def cache_identity(body: dict[str, Any]) -> dict[str, Any]:
    """Body minus the served name (model identity is keyed explicitly), plus explicit nulls."""
    keyed = {k: v for k, v in body.items() if k != "model"}
    for name in ("temperature", "top_p", "top_k", "stop", "seed"):
        keyed.setdefault(name, None)
    return keyed


class Generator:
    """Drives work items through cache, engine and writers for one task."""

    def __init__(
        self,
        client: ChatClient | None,
        cache: RequestCache,
        data: ChunkWriter,
        rejected: ChunkWriter,
        row_fields: dict[str, Any],
        max_in_flight: int,
        on_row_done: Any = None,
    ) -> None:
        self.client = client
        self.cache = cache
        self.data = data
        self.rejected = rejected
        self.row_fields = row_fields  # model, revision, engine
        self.max_in_flight = max_in_flight
        self.stats = SessionStats()
        self.on_row_done = on_row_done or (lambda key, whole=False: None)
        self.on_tokens = lambda n: None
        self.prices: Prices | None = None  # model.price_*: each row's cost_usd
        self.on_cost = lambda usd: None
        self._failed_in_a_row = 0
        self._answered = 0  # answers (not refusals) received in this session
        self._refusals: list[tuple[int, str]] = []

    @staticmethod
    def empty_stats() -> SessionStats:
        return SessionStats()

    async def run(self, plan: Iterable[WorkItem | Reject]) -> None:
        """Feed and drain; the first failure anywhere (engine gone for good) stops everything."""
        queue: asyncio.Queue[WorkItem | None] = asyncio.Queue(maxsize=self.max_in_flight * 2)
        workers = [self._worker(queue) for _ in range(self.max_in_flight)]
        await run_pool(self._feed(plan, queue, len(workers)), workers)

    async def replay(self, plan: Iterable[WorkItem | Reject]) -> list[tuple[str, int]]:
        """Before any engine starts: settle rejects and cached answers in plan order, up to the
        first item that must be sent. Returns the (id, rollout) pairs settled (rollout -1: the
        whole row). Nothing is planned twice: the caller takes these out of what the engine gets."""
        settled: list[tuple[str, int]] = []
        for batch in batched(plan, LOOKUP_BATCH):
            items = [x for x in batch if isinstance(x, WorkItem)]
            hits = await self.cache.get_many(it.cache_key for it in items) if items else {}
            for x in batch:
                if isinstance(x, Reject):
                    await self._reject(x)
                    settled.append((x.id, x.rollout))
                    continue
                hit = hits.get(x.cache_key)
                if hit is None:
                    return settled
                self.stats.cache_hits += 1
                await self._settle(x, hit, from_cache=True)
                settled.append((x.key, x.rollout))
        return settled

    async def _feed(self, plan: Iterable[WorkItem | Reject], queue: asyncio.Queue, n_workers: int) -> None:
        for batch in batched(plan, LOOKUP_BATCH):
            items = [x for x in batch if isinstance(x, WorkItem)]
            for x in batch:
                if isinstance(x, Reject):
                    await self._reject(x)
            hits = await self.cache.get_many(it.cache_key for it in items) if items else {}
            for it in items:
                hit = hits.get(it.cache_key)
                if hit is not None:
                    self.stats.cache_hits += 1
                    await self._settle(it, hit, from_cache=True)
                else:
                    await queue.put(it)
        for _ in range(n_workers):
            await queue.put(None)

    async def _worker(self, queue: asyncio.Queue) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            if self.stats.first_send is None:
                self.stats.first_send = time.monotonic()
            self.stats.requests_sent += 1
            try:
                answer: dict[str, Any] = (await self.client.complete(item.body, item.cache_key)).to_json()
            except RequestRejected as exc:
                if not self._answered:  # nothing answered yet: maybe the config, not the row
                    await self._reject_before_any_answer(item, exc)
                    continue
                answer = {"error": {"status": exc.status, "message": exc.message}}
            except RequestFailed as exc:
                await self._reject(Reject(item.key, item.rollout, "request", str(exc), retryable=True))
                self._failed_in_a_row += 1
                gone = engine_gone(self._failed_in_a_row, self.max_in_flight, exc)
                if gone is not None:
                    raise gone from None
                continue
            self._failed_in_a_row = 0
            self._answered += "error" not in answer
            self.stats.last_answer = time.monotonic()
            await self.cache.put(item.cache_key, answer)
            await self._settle(item, answer, from_cache=False)

    async def _reject_before_any_answer(self, item: WorkItem, exc: RequestRejected) -> None:
        """A 4xx before the engine answered anything in this session is quarantined as retryable
        and not cached: if every request is refused the same way (a wrong model name, a field the
        engine does not take), the config is at fault, the run stops, and the fixed re-run sends
        those rows again instead of keeping them rejected for good."""
        reason = f"engine rejected the request (HTTP {exc.status}): {exc.message}"
        self._refusals.append((exc.status, exc.message))
        # counted before the await below, so exactly one worker sees the threshold reached
        stop = len(self._refusals) == FAILED_IN_A_ROW and len(set(self._refusals)) == 1
        await self._reject(Reject(item.key, item.rollout, "request", reason, retryable=True))
        if stop:
            raise EngineError(
                f"the engine refused the first {FAILED_IN_A_ROW} requests alike (HTTP {exc.status}: "
                f"{exc.message}); check model.name_or_path / model.served_name and generation.*, then re-run "
                "the same command (those rows are sent again)"
            )

    async def _settle(self, item: WorkItem, answer: dict[str, Any], from_cache: bool) -> None:
        if "error" in answer:
            err = answer["error"]
            reason = f"engine rejected the request (HTTP {err['status']}): {err['message']}"
            await self._reject(Reject(item.key, item.rollout, "request", reason))
            return
        c = Completion(**answer)
        cost = self.prices.cost(c.prompt_tokens, c.cached_tokens, c.completion_tokens) if self.prices else None
        s = self.stats
        s.answers += 1
        if not from_cache:
            s.prompt_tokens += c.prompt_tokens
            s.prompt_tokens_cached += c.cached_tokens
            s.completion_tokens += c.completion_tokens
            if cost is not None:
                s.cost_usd += cost
                self.on_cost(cost)
            self.on_tokens(c.completion_tokens)
        s.finish_reasons[c.finish_reason] += 1
        s.truncated += item.truncated
        if c.content_null:
            s.content_null += 1
            if s.content_null == 1:
                log.warning("row %s: the answer's content is null; written as '' with content_null=true", item.key)
        await self.data.add(
            {
                "id": item.key,
                "rollout": item.rollout,
                "messages": item.body["messages"],
                "text": c.text,
                "content_null": c.content_null,
                "reasoning": c.reasoning,
                "finish_reason": c.finish_reason,
                "length_stopped": c.finish_reason == "length",
                "truncated": item.truncated,
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens,
                "cached_tokens": c.cached_tokens,
                "cost_usd": cost,
                "metadata": item.metadata,
                **self.row_fields,
            }
        )
        self.on_row_done(item.key)

    async def _reject(self, r: Reject) -> None:
        self.stats.rejected[r.stage] += 1
        await self.rejected.add(r.row())
        self.on_row_done(r.id, r.rollout < 0)


async def run_pool(feed: Coroutine[Any, Any, None], workers: list[Coroutine[Any, Any, None]]) -> None:
    """A feeder and its workers as tasks; the first failure anywhere cancels the rest and is raised."""
    tasks = [asyncio.create_task(c) for c in (feed, *workers)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def engine_gone(
    failed_in_a_row: int, in_flight: int, exc: BaseException, which: str = "the engine"
) -> EngineError | None:
    """Requests failing in a row past the in-flight limit mean the engine is gone, not that rows are bad."""
    if failed_in_a_row < max(FAILED_IN_A_ROW, in_flight):
        return None
    return EngineError(
        f"{which} stopped answering: {failed_in_a_row} requests in a row failed after their retries "
        f"(last: {exc}); re-run the same command once it is back (those rows are retried)"
    )


def dump_prompt(value: Any, limit: int = 10_000) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    # lone surrogates (seen in scraped JSON) cannot go into Parquet: keep them visible, escaped
    return text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")
