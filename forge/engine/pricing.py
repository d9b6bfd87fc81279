"""What requests cost (`model.price_*_per_mtok`) and the spending cap (`run.budget_usd`).

A row's `cost_usd` comes from the token counts the engine reported for its answer: prompt tokens
at the input price (those served from the provider's prompt cache at the cached-input price) and
completion tokens at the output price. The budget is kept before sending: each request reserves
its worst case (its prompt, measured, at the input price plus max_tokens at the output price)
and no request is sent when what was spent plus what is reserved would pass the cap — so the
spend never passes it, however many requests are in flight. A request refused that way waits
for those in flight to be answered (and cached) and tries again; the run stops only when none
is left in flight, so no paid answer is thrown away. Spend is counted over the run dir's
whole life: a re-run with the same budget stops at once; raise the budget to go on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from forge.engine.server import EngineError

MTOK = 1_000_000
BATCH_ENGINES = ("openai_batch", "anthropic_batch")  # billed at the batch discount


class BudgetReached(EngineError):
    """The next request could pass run.budget_usd: the run stops, everything finished kept."""


@dataclass(frozen=True)
class Prices:
    """US dollars per million tokens."""

    input: float
    output: float
    cached_input: float

    @classmethod
    def of(cls, m: Any) -> Prices | None:
        """The model config's prices, less model.batch_discount on a batch engine; None when it
        names none (then no cost is computed)."""
        if m.price_in_per_mtok is None and m.price_out_per_mtok is None:
            return None
        inp = m.price_in_per_mtok or 0.0
        cached = m.price_cached_in_per_mtok if m.price_cached_in_per_mtok is not None else inp
        factor = 1.0 - m.batch_discount if getattr(m.engine, "value", m.engine) in BATCH_ENGINES else 1.0
        return cls(inp * factor, (m.price_out_per_mtok or 0.0) * factor, cached * factor)

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        cached = min(max(cached_tokens, 0), prompt_tokens)
        return (
            (prompt_tokens - cached) * self.input + cached * self.cached_input + completion_tokens * self.output
        ) / MTOK

    def worst(self, prompt_tokens: int, max_tokens: int) -> float:
        return (prompt_tokens * self.input + max_tokens * self.output) / MTOK


class Budget:
    """Spent + reserved never above `limit_usd`; `spent_before` is what earlier sessions spent.
    One per task, shared by its models (each request reserves at its own model's prices)."""

    def __init__(self, limit_usd: float, spent_before: float = 0.0) -> None:
        self.limit = limit_usd
        self.spent = spent_before
        self.spent_before = spent_before
        self.reserved = 0.0
        self.in_flight = 0
        self._settled: asyncio.Event | None = None

    async def wait_reserve(self, prices: Prices, prompt_tokens: int, max_tokens: int) -> float:
        """reserve(), but while requests are in flight a refusal waits for one of them to settle
        (an answer usually costs less than its worst case, which frees room) and tries again.
        Raises BudgetReached only with nothing in flight: every paid answer is kept."""
        while True:
            try:
                return self.reserve(prices, prompt_tokens, max_tokens)
            except BudgetReached:
                if not self.in_flight:
                    raise
            if self._settled is None:
                self._settled = asyncio.Event()
            self._settled.clear()
            await self._settled.wait()

    def reserve(self, prices: Prices, prompt_tokens: int, max_tokens: int) -> float:
        worst = prices.worst(prompt_tokens, max_tokens)
        if self.spent + self.reserved + worst > self.limit:
            raise BudgetReached(
                f"run.budget_usd={self.limit:g} reached: ${self.spent:.4f} spent, "
                f"${max(self.reserved, 0.0):.4f} in flight, and "
                f"the next request could cost up to ${worst:.4f}; every finished row is kept: raise "
                "run.budget_usd and re-run the same command to go on"
            )
        self.reserved += worst
        self.in_flight += 1
        return worst

    def settle(self, reserved: float, actual: float) -> None:
        self.reserved -= reserved
        self.spent += actual
        self._done()

    def release(self, reserved: float) -> None:
        """A request that got no answer: nothing is known to be billed."""
        self.reserved -= reserved
        self._done()

    def _done(self) -> None:
        self.in_flight -= 1
        if self._settled is not None:
            self._settled.set()


def bytes_upper_bound(messages: list[dict[str, Any]]) -> int:
    """Prompt tokens at most (no tokenizer to count with): one per UTF-8 byte of the contents,
    plus a few per message for the chat template's markers."""
    return sum(len(str(m.get("content") or "").encode()) + 8 for m in messages)


class BudgetedClient:
    """A client (ChatClient, InProcessClient) whose requests each hold their worst-case cost in
    the budget while in flight. `count` measures a prompt's tokens (the model's tokenizer, else
    bytes_upper_bound); `notes`/`load`/`adaptive` of the client are reached through it."""

    def __init__(self, inner: Any, budget: Budget, prices: Prices, count: Any) -> None:
        self.inner = inner
        self.budget = budget
        self.prices = prices
        self.count = count
        self.load = getattr(inner, "load", None)
        self.adaptive = getattr(inner, "adaptive", None)
        self.batch_notes = getattr(inner, "notes", None)

    async def __aenter__(self) -> BudgetedClient:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.inner.__aexit__(*exc)

    async def complete(self, body: dict[str, Any], key: str | None = None, priority: int = 0) -> Any:
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 0)
        reserved = await self.budget.wait_reserve(self.prices, self.count(body["messages"]), max_tokens)
        try:
            answer = await self.inner.complete(body, key, priority)
        except BaseException:
            self.budget.release(reserved)
            raise
        self.budget.settle(
            reserved, self.prices.cost(answer.prompt_tokens, answer.cached_tokens, answer.completion_tokens)
        )
        return answer
