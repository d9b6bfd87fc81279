"""`generate`, as a rollout sees it: one engine call that goes through the request cache.

Each call is keyed on its own body (messages and every sampling parameter), the model's
identity, the sample index and — for the k-th identical call of one rollout (best-of-n) —
k, so a re-run replays finished steps from the cache and sends only the missing ones.
Lookups are batched (one query per event-loop turn) and skipped while the cache was empty at
the start and holds only this session's answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from forge.engine import EngineError, RequestFailed, RequestRejected
from forge.engine.config import EngineKind
from forge.engine.pricing import Prices
from forge.stages.generate.cache import CacheWriteError, RequestCache, request_key
from forge.stages.generate.config import GenerationConfig
from forge.stages.generate.generator import FAILED_IN_A_ROW, SessionStats, cache_identity, engine_gone, request_body
from forge.stages.generate.rollout.slots import Slots
from forge.stages.generate.rollout.structured import JsonSchema

SAMPLING = {f.name for f in dataclasses.fields(GenerationConfig)} - {"rollouts", "extra_body", "json_retries"}
SEED_STEP = 1_000_003  # seed offset of the k-th identical call (distinct samples, reproducible)


@dataclass
class Answer:
    """What one `generate` call returns. `parsed` holds the validated JSON when a schema was asked."""

    text: str
    reasoning: str | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    content_null: bool = False
    parsed: Any = None
    cached: bool = False  # replayed from forge's request cache
    cached_tokens: int = 0  # prompt tokens the engine served from its prefix cache

    def __str__(self) -> str:
        return self.text

    def __getitem__(self, key: str) -> Any:
        """answer["text"] as well as answer.text (code written for dict-shaped answers)."""
        if key not in self.__dataclass_fields__:
            raise KeyError(f"{key!r}: an answer has {', '.join(self.__dataclass_fields__)}")
        return getattr(self, key)


class StepFailed(Exception):
    """A call that gave no usable answer: its row is quarantined with this stage and reason."""

    def __init__(self, stage: str, reason: str, retryable: bool = False, answer: str | None = None) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason
        self.retryable = retryable
        self.answer = answer


@dataclass
class Lane:
    """One model a rollout can call: `model` (the main one) or `judge_model`."""

    name: str
    served: str
    identity: dict[str, Any]
    gen: GenerationConfig
    engine: EngineKind
    schema: JsonSchema | None = None
    client: Any = None
    limit: Slots | None = None
    in_flight: int = 1
    prices: Prices | None = None  # this model's model.price_*: the sample's cost_usd
    # per engine: a dead judge must stop the run even while the model answers, and a judge that
    # refuses everything (a wrong served name) must not have its refusals cached as answers
    failed_in_a_row: int = 0
    answered: int = 0
    refusals: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class Calls:
    """The task's engine calls: cache, lanes, counters, and the engine-is-gone rule."""

    cache: RequestCache
    lanes: dict[str, Lane]
    stats: SessionStats
    cache_was_empty: bool
    later_steps_first: bool = True  # rollout.later_steps_first: a slot goes to the sample furthest along
    on_tokens: Any = None
    on_cost: Any = None
    # the first engine or cache failure: it stops the run even if a user's `except Exception`
    # around generate() swallowed it (the driver re-raises it once the rollout returns)
    fatal: BaseException | None = None
    _written: set[str] = field(default_factory=set)
    _pending: list[tuple[str, asyncio.Future]] = field(default_factory=list)
    _lookups: set[asyncio.Task] = field(default_factory=set)

    async def lookup(self, key: str) -> dict[str, Any] | None:
        if self.cache_was_empty and key not in self._written:
            return None
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((key, fut))
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self._start_lookup)
        try:
            return await fut
        except CacheWriteError as exc:
            self.fatal = self.fatal or exc
            raise

    def _start_lookup(self) -> None:
        task = asyncio.ensure_future(self._lookup_batch())
        self._lookups.add(task)  # referenced until done (the loop keeps only weak references)
        task.add_done_callback(self._lookups.discard)

    async def _lookup_batch(self) -> None:
        batch, self._pending = self._pending, []
        try:
            found = await self.cache.get_many(k for k, _ in batch)
        except Exception as exc:  # every waiter gets the cache's one-line error
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for key, fut in batch:
            if not fut.done():
                fut.set_result(found.get(key))

    async def send(
        self, lane: Lane, body: dict[str, Any], key: str, parked: Any = None, step: int = 1
    ) -> dict[str, Any]:
        """The engine's answer (or its refusal, `{"error": ...}`), committed to the cache.
        parked: a context manager held while the call waits for a free engine slot; step: the
        sample's how-manieth call this is (later steps get a free slot first)."""
        priority = -step if self.later_steps_first else 0
        try:
            return await self._send(lane, body, key, parked or contextlib.nullcontext(), priority)
        except (EngineError, CacheWriteError) as exc:
            self.fatal = self.fatal or exc
            raise

    async def _send(self, lane: Lane, body: dict[str, Any], key: str, parked: Any, priority: int) -> dict[str, Any]:
        """The slot is held until the answer is committed to the cache: a kill then loses at most
        one engine's in-flight limit of requests, answered or not."""
        assert lane.client is not None and lane.limit is not None
        with parked:
            await lane.limit.acquire(priority)
        try:  # also when the sample is cancelled (rollout.timeout_s): its request is dropped
            answer = await self._ask(lane, body, key, priority)
            self._written.add(key)
            await self.cache.put(key, answer)
            return answer
        finally:
            lane.limit.release()

    async def _ask(self, lane: Lane, body: dict[str, Any], key: str, priority: int = 0) -> dict[str, Any]:
        s = self.stats
        if s.first_send is None:
            s.first_send = time.monotonic()
        s.requests_sent += 1
        try:
            answer = (await lane.client.complete(body, key, priority)).to_json()
        except RequestRejected as exc:
            if not lane.answered:
                self._refused_before_any_answer(lane, exc)
            answer = {"error": {"status": exc.status, "message": exc.message}}
        except RequestFailed as exc:
            lane.failed_in_a_row += 1
            gone = engine_gone(lane.failed_in_a_row, lane.in_flight, exc, f"the {lane.name} engine")
            if gone is not None:
                raise gone from None
            raise StepFailed("request", str(exc), retryable=True) from None
        lane.failed_in_a_row = 0
        if "error" not in answer:
            lane.answered += 1
            s.answers += 1
            s.prompt_tokens += answer["prompt_tokens"]
            s.prompt_tokens_cached += answer.get("cached_tokens", 0)
            if lane.prices is not None:
                cost = lane.prices.cost(
                    answer["prompt_tokens"], answer.get("cached_tokens", 0), answer["completion_tokens"]
                )
                s.cost_usd += cost
                if self.on_cost:
                    self.on_cost(cost)
            s.completion_tokens += answer["completion_tokens"]
            if self.on_tokens:
                self.on_tokens(answer["completion_tokens"])
        s.last_answer = time.monotonic()
        return answer

    def _refused_before_any_answer(self, lane: Lane, exc: RequestRejected) -> None:
        """Refusals before any answer may be the config's fault: retryable, not cached; 16 alike stop."""
        lane.refusals.append((exc.status, exc.message))
        if len(lane.refusals) == FAILED_IN_A_ROW and len(set(lane.refusals)) == 1:
            raise EngineError(
                f"the {lane.name} engine refused the first {FAILED_IN_A_ROW} requests alike (HTTP {exc.status}: "
                f"{exc.message}); check {lane.name}.name_or_path / served_name and generation.*, then re-run "
                "the same command (those rows are sent again)"
            )
        raise StepFailed("request", f"engine rejected the request (HTTP {exc.status}): {exc.message}", True)


class Generate:
    """The `generate` a rollout function gets: `await generate(messages, **sampling)`.

    messages: a string (one user turn) or a list of {role, content}. sampling: any
    generation.* key (max_tokens, temperature, top_p, top_k, seed, stop, json_schema);
    other keys are sent in the request body as they are. model="judge" calls judge_model.
    step="name" labels the call in quarantine reasons."""

    def __init__(self, calls: Calls, sample: int) -> None:
        self.calls = calls
        self.sample = sample
        self.seen: Counter[str] = Counter()
        self.steps = 0  # calls started
        self.waiting = 0  # calls started and not yet answered (a timeout says which it hit)
        self.parked_s = 0.0  # time waiting for a free engine slot: rollout.timeout_s does not count it
        self._parked = 0  # calls waiting for a slot now
        self._parked_since = 0.0
        self.label = ""
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.cost_usd: float | None = None  # None until an answer from a model with prices
        self.finish_reason: str | None = None
        self.length_stopped = False
        self.content_null = False
        self.truncated = False  # a prompt was cut to fit the context (ctx.messages)

    @contextlib.contextmanager
    def parking(self) -> Any:
        """Held while one of this sample's calls waits for an engine slot (concurrent calls: the
        time any of them waits is counted once)."""
        if not self._parked:
            self._parked_since = time.monotonic()
        self._parked += 1
        try:
            yield
        finally:
            self._parked -= 1
            if not self._parked:
                self.parked_s += time.monotonic() - self._parked_since

    def parked_for(self) -> float:
        """Seconds this sample has waited for engine slots so far."""
        return self.parked_s + (time.monotonic() - self._parked_since if self._parked else 0.0)

    def where(self) -> str:
        """The step a failure happened in, for its quarantine reason."""
        if not self.steps:
            return "before the first generate call"
        return f"step {self.steps}" + (f" ({self.label})" if self.label else "")

    async def __call__(
        self,
        messages: str | list[dict[str, Any]],
        *,
        model: str = "model",
        step: str | None = None,
        **sampling: Any,
    ) -> Answer:
        lane = self._lane(model)
        self.steps += 1
        self.label = step or ""
        self.waiting += 1
        try:
            return await self._call(lane, messages, sampling)
        finally:
            self.waiting -= 1

    async def _call(self, lane: Lane, messages: str | list[dict[str, Any]], sampling: dict[str, Any]) -> Answer:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        schema = lane.schema
        if "json_schema" in sampling:
            from forge.stages.generate.rollout.structured import load_schema

            value = sampling.pop("json_schema")
            schema = value if isinstance(value, JsonSchema) or value is None else load_schema(value)
        if "rollouts" in sampling:
            raise TypeError("generate() takes no rollouts: generation.rollouts samples whole rollouts")
        retries = sampling.pop("json_retries", lane.gen.json_retries)
        extra = sampling.pop("extra_body", None) or {}
        known = {k: sampling.pop(k) for k in list(sampling) if k in SAMPLING}
        if isinstance(known.get("stop"), str):
            known["stop"] = [known["stop"]]
        gen = dataclasses.replace(lane.gen, **known) if known else lane.gen
        body = request_body(list(messages), lane.served, gen, self.sample)
        body.update(extra)
        body.update(sampling)
        if schema is not None:
            body.update(schema.request_fields(lane.engine))
        attempts = 1 + (retries if schema is not None else 0)
        base = request_key(cache_identity(body), lane.identity, self.sample)
        repeat = self.seen[base]
        self.seen[base] += 1
        last = None
        for attempt in range(attempts):
            answer = await self._one(lane, body, base, repeat, attempt)
            if schema is None:
                return answer
            parsed, problem = schema.check(answer.text)
            if problem is None:
                answer.parsed = parsed
                return answer
            last = (answer.text, problem)
        text, problem = last
        raise StepFailed(
            "json_schema",
            f"the answer does not match generation.json_schema ({schema.origin}) "
            f"after {attempts} attempt(s): {problem}",
            answer=text,
        )

    def _lane(self, model: str) -> Lane:
        lanes = self.calls.lanes
        name = "judge_model" if model in ("judge", "judge_model") else model
        if name == "judge_model" and name not in lanes:
            name = "model"  # no judge_model configured: the main model judges
        if name not in lanes:
            raise ValueError(f"generate(model={model!r}): the models of this run are 'model' and 'judge'")
        return lanes[name]

    async def _one(self, lane: Lane, body: dict[str, Any], base: str, repeat: int, attempt: int) -> Answer:
        if repeat or attempt:  # the k-th identical call, or a retry: its own sample and key
            body = dict(body)
            if body.get("seed") is not None:
                body["seed"] += (repeat + attempt * 7919) * SEED_STEP
            identity = {**lane.identity, "repeat": repeat, "attempt": attempt}
            key = request_key(cache_identity(body), identity, self.sample)
        else:
            key = base
        cached = await self.calls.lookup(key)
        if cached is not None:
            self.calls.stats.cache_hits += 1
            raw = cached
        else:
            raw = await self.calls.send(lane, body, key, self.parking(), self.steps)
        if "error" in raw:
            err = raw["error"]
            raise StepFailed("request", f"engine rejected the request (HTTP {err['status']}): {err['message']}")
        answer = Answer(**raw, cached=cached is not None)
        self.requests += 1
        self.prompt_tokens += answer.prompt_tokens
        self.completion_tokens += answer.completion_tokens
        self.cached_tokens += answer.cached_tokens
        if lane.prices is not None:
            cost = lane.prices.cost(answer.prompt_tokens, answer.cached_tokens, answer.completion_tokens)
            self.cost_usd = (self.cost_usd or 0.0) + cost
        self.finish_reason = answer.finish_reason
        self.length_stopped |= answer.finish_reason == "length"
        self.content_null |= answer.content_null
        self.calls.stats.finish_reasons[answer.finish_reason] += 1
        return answer
