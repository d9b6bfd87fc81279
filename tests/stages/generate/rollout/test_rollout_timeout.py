"""rollout.timeout_s on the driver itself (a fake engine, the real request cache, in-process, under
a second): a sample past the limit is cancelled with its in-flight request and quarantined naming
the limit and the step it was in; waiting for an engine slot that hung samples hold is not counted;
a sample that swallows its cancellation is cancelled again; its finished steps stay cached."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from forge.engine.client import Completion
from forge.engine.config import EngineKind
from forge.stages.generate.cache import RequestCache
from forge.stages.generate.config import GenerationConfig
from forge.stages.generate.generator import SessionStats
from forge.stages.generate.rollout.calls import Calls, Lane
from forge.stages.generate.rollout.driver import RolloutDriver, RolloutItem
from forge.stages.generate.rollout.slots import Slots

LIMIT = 0.5
HEALTHY = [f"ok{i}" for i in range(10)]


class FakeEngine:
    """Answers after `delay_s`; a prompt in `hang` is never answered (until cancelled)."""

    def __init__(self, hang: set[str], delay_s: float = 0.05) -> None:
        self.hang = hang
        self.delay_s = delay_s
        self.sent: list[str] = []
        self.priorities: dict[str, int] = {}  # what forge passes on (vLLM's scheduling priority)
        self.cancelled: list[str] = []

    async def complete(self, body: dict[str, Any], key: str | None = None, priority: int = 0) -> Completion:
        prompt = body["messages"][-1]["content"]
        self.sent.append(prompt)
        self.priorities[prompt] = priority
        try:
            await (asyncio.Event().wait() if prompt in self.hang else asyncio.sleep(self.delay_s))
        except asyncio.CancelledError:
            self.cancelled.append(prompt)
            raise
        return Completion(f"answer to {prompt}", None, "stop", 3, 2)


async def two_steps(row: dict[str, Any], generate: Any, ctx: Any) -> dict[str, Any]:
    if row["id"] == "early" and ctx.options["stall"]:
        await asyncio.Event().wait()  # stuck before any engine call
    draft = await generate(f"draft {row['id']}", step="draft")
    if row["id"] == "tool" and ctx.options["stall"]:
        try:
            await asyncio.Event().wait()  # a tool that never answers ...
        except asyncio.CancelledError:
            await asyncio.Event().wait()  # ... and swallows the first cancellation
    check = await generate(f"check {row['id']}", step="check")
    return {"draft": draft.text, "check": check.text}


class Rows:
    """Stands in for the data and rejected/ writers."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.columns = SimpleNamespace(conform=lambda row: None)

    async def add_group(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)

    async def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)


async def run(cache_path: Path, engine: FakeEngine, ids: list[str], limit: float | None, stall: bool):
    async with RequestCache(cache_path) as cache:
        lane = Lane(
            "model",
            "fake",
            {"model": "fake"},
            GenerationConfig(max_tokens=4),
            EngineKind.endpoint,
            client=engine,
            limit=Slots(1),  # one engine slot: a hung request holds it until cancelled
        )
        calls = Calls(cache, {"model": lane}, SessionStats(), cache_was_empty=not await cache.any())
        ctx = SimpleNamespace(cfg=SimpleNamespace(timeout_s=limit), options={"stall": stall})
        data, rejected = Rows(), Rows()
        driver = RolloutDriver(two_steps, "t:two_steps", ctx, calls, data, rejected, {}, lambda *a: None)
        plan = [RolloutItem(i, 0, {"id": i}, f"d.jsonl:{n}", None) for n, i in enumerate(ids)]
        await asyncio.wait_for(driver.run(plan, max_active=len(ids)), 30)
        return data.rows, {r["id"]: r for r in rejected.rows}, calls.stats


def test_timed_out_samples_are_cancelled_quarantined_and_resumed_from_the_cache(tmp_path: Path) -> None:
    ids = ["early", "engine", "tool", *HEALTHY]
    engine = FakeEngine(hang={"check engine"})
    data, rejected, _ = asyncio.run(run(tmp_path / "c.sqlite", engine, ids, LIMIT, stall=True))

    # the healthy samples waited longer than the limit for the one slot (the hung request held it,
    # then ten samples x two steps queued on it), yet none timed out: waiting for a slot is not counted
    assert sorted({r["id"] for r in data}) == sorted(HEALTHY)
    assert set(rejected) == {"early", "engine", "tool"}
    assert all(r["stage"] == "rollout" and r["retryable"] for r in rejected.values())
    assert rejected["engine"]["reason"] == (
        "timed out after rollout.timeout_s=0.5 s in step 2 (check), waiting for the engine; cancelled"
    )
    assert rejected["engine"]["step"] == "step 2 (check)"
    assert rejected["tool"]["reason"] == (
        "timed out after rollout.timeout_s=0.5 s in step 1 (draft), after its answer (in the rollout's own "
        "code); cancelled"
    )
    assert rejected["tool"]["step"] == "step 1 (draft)"
    assert rejected["early"]["reason"] == (
        "timed out after rollout.timeout_s=0.5 s before the first generate call (in the rollout's own code); cancelled"
    )
    assert engine.cancelled == ["check engine"]  # the hung request itself was cancelled, its slot freed

    # a re-run with a larger limit: the finished drafts come from the cache, only the rest is sent
    again = FakeEngine(hang=set())
    data, rejected, stats = asyncio.run(run(tmp_path / "c.sqlite", again, ["early", "engine", "tool"], 5, False))
    assert sorted(r["id"] for r in data) == ["early", "engine", "tool"] and not rejected
    assert sorted(again.sent) == ["check early", "check engine", "check tool", "draft early"]
    assert stats.cache_hits == 2 and stats.requests_sent == 4


def test_without_a_limit_nothing_is_timed_out(tmp_path: Path) -> None:
    engine = FakeEngine(hang=set())
    data, rejected, _ = asyncio.run(run(tmp_path / "c.sqlite", engine, HEALTHY[:3], None, False))
    assert len(data) == 3 and not rejected
    # each call carries its step as the engine's priority (lower first): checks before drafts
    assert {p: engine.priorities[p] for p in sorted(engine.priorities)} == {
        **{f"check {i}": -2 for i in HEALTHY[:3]},
        **{f"draft {i}": -1 for i in HEALTHY[:3]},
    }
