"""`run.plan=true`: what a generation run would take — rows, requests, tokens, cost and time —
estimated before it runs, from the prompts (measured with the model's tokenizer) and a pilot of
`run.plan_pilot` real answers. Nothing else is sent and no shard is written; the pilot's answers
go into the request cache, so the real run replays them instead of paying for them twice.
The estimate is also written to `plan.json` in the run dir."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from forge.config import ForgeConfig
from forge.engine import RequestFailed, RequestRejected, open_engine
from forge.engine.pricing import Prices
from forge.run.output import done_keys, write_json_atomic
from forge.stages.generate import task_parts as parts
from forge.stages.generate.cache import RequestCache, check_cache
from forge.stages.generate.generator import SessionStats, WorkItem
from forge.stages.generate.plan import Planner
from forge.stages.generate.stats import session_record, write_task_stats

log = logging.getLogger("forge.stages.generate.estimate")


async def estimate_run(cfg: ForgeConfig, source: Any, template: str | None, model_path: str) -> dict[str, Any]:
    out_dir = Path(cfg.output.dir)
    data_dir, rej_dir = out_dir / "data", out_dir / "rejected"
    scans = []
    for task in range(cfg.cluster.tasks):
        done, whole = done_keys(data_dir, rej_dir, task, cfg.run.retry_failed)
        planner = Planner(cfg, source, task, cfg.cluster.tasks, template)
        scans.append((planner, planner.scan(done, whole), done))
    rows = sum(scan.rows for _, scan, _ in scans)
    rows_to_go = sum(len(scan.pending) for _, scan, _ in scans)
    requests = sum(scan.units for _, scan, _ in scans)
    planner, scan, done = scans[0]
    m = cfg.model
    engine = open_engine(m, model_path, out_dir / "logs" / "engine_plan.log", cfg.generation.seed)
    try:
        await parts.start_engine(engine, m)
        tokenizer = await asyncio.to_thread(parts.open_tokenizer, cfg, model_path)
        fitter = parts.make_fitter(cfg, tokenizer, engine.reported_max_model_len, model_path)
        in_flight = (await parts.size_in_flight(cfg, engine, planner, fitter))["in_flight"]
        mean_prompt = planner.mean_prompt_tokens(fitter, sample=256)
        identity = {"model": m.name_or_path, "revision": m.revision, "engine": m.engine.value}
        items = []
        for item in planner.plan(scan.pending, done, fitter, engine.served_model, identity):
            if isinstance(item, WorkItem):
                items.append(item)
            if len(items) >= cfg.run.plan_pilot:
                break
        cache_path = out_dir / "cache" / "task_00000.sqlite"
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(check_cache, cache_path)
        client = parts.make_client(cfg, engine, fitter.tok, in_flight, lambda reason: None)
        async with RequestCache(cache_path) as cache, client:
            pilot = await _pilot(client, cache, items, in_flight)
    finally:
        await engine.stop()
    _record_pilot(cfg, out_dir, scan.rows, pilot)
    return _summary(cfg, rows, rows_to_go, requests, mean_prompt, pilot, in_flight)


def _record_pilot(cfg: ForgeConfig, out_dir: Path, rows: int, pilot: list[dict[str, Any]]) -> None:
    """The pilot as a session of task 0 (status `plan`): what it sent and spent counts toward
    stats.json and run.budget_usd like any other session's."""
    stats = SessionStats()
    prices = Prices.of(cfg.model)
    for a in pilot:
        if a["seconds"] is None:  # replayed from the cache: paid for earlier
            continue
        stats.requests_sent += 1
        stats.answers += 1
        stats.prompt_tokens += a["prompt_tokens"]
        stats.completion_tokens += a["completion_tokens"]
        if prices is not None:
            stats.cost_usd += prices.cost(a["prompt_tokens"], a.get("cached_tokens", 0), a["completion_tokens"])
    write_task_stats(out_dir, 0, rows, session_record(stats, None, None, 0, 0, "plan"))


async def _pilot(client: Any, cache: RequestCache, items: list[WorkItem], in_flight: int) -> list[dict[str, Any]]:
    """Each pilot request once (a cached answer is read, not sent): answer, seconds, cached."""
    hits = await cache.get_many(it.cache_key for it in items)
    limit = asyncio.Semaphore(in_flight)

    async def one(item: WorkItem) -> dict[str, Any] | None:
        if item.cache_key in hits and "error" not in hits[item.cache_key]:
            return {**hits[item.cache_key], "seconds": None}
        async with limit:
            t0 = time.monotonic()
            try:
                answer = (await client.complete(item.body)).to_json()
            except (RequestRejected, RequestFailed) as exc:
                log.warning("plan: a pilot request failed (%s); the estimate uses the others", exc)
                return None
            await cache.put(item.cache_key, answer)
            return {**answer, "seconds": time.monotonic() - t0}

    return [a for a in await asyncio.gather(*(one(it) for it in items)) if a is not None]


def _summary(
    cfg: ForgeConfig,
    rows: int,
    rows_to_go: int,
    requests: int,
    mean_prompt: int | None,
    pilot: list[dict[str, Any]],
    in_flight: int,
) -> dict[str, Any]:
    n = len(pilot)
    mean_out = sum(a["completion_tokens"] for a in pilot) / n if n else None
    measured_by = "the model's tokenizer"
    if mean_prompt is None and n:  # no tokenizer: the engine's own counts of the pilot's prompts
        mean_prompt = round(sum(a["prompt_tokens"] for a in pilot) / n)
        measured_by = "the pilot's usage counts"
    timed = [a["seconds"] for a in pilot if a["seconds"] is not None]
    latency = sum(timed) / len(timed) if timed else None
    prices = Prices.of(cfg.model)
    prompt_tokens = mean_prompt * requests if mean_prompt is not None else None
    completion_tokens = round(mean_out * requests) if mean_out is not None else None
    cost = None
    if prices is not None and prompt_tokens is not None and completion_tokens is not None:
        cost = prices.cost(prompt_tokens, 0, completion_tokens)
    return {
        "rows": rows,
        "rows_to_go": rows_to_go,
        "requests": requests,
        "mean_prompt_tokens": mean_prompt,
        "prompt_tokens_from": measured_by if mean_prompt is not None else None,
        "prompt_tokens": prompt_tokens,
        "pilot_answers": n,
        "mean_completion_tokens": round(mean_out, 1) if mean_out is not None else None,
        "completion_tokens": completion_tokens,
        "max_completion_tokens": cfg.generation.max_tokens * requests,
        "cost_usd": round(cost, 4) if cost is not None else None,
        "worst_cost_usd": round(prices.worst(prompt_tokens, cfg.generation.max_tokens * requests), 4)
        if prices is not None and prompt_tokens is not None
        else None,
        "in_flight": in_flight,
        "mean_latency_s": round(latency, 3) if latency is not None else None,
        # in_flight requests at the pilot's latency at once; a rate limit or a busier server is slower
        "time_s": round(requests * latency / in_flight, 1) if latency is not None and in_flight else None,
    }


def report(out_dir: Path, estimate: dict[str, Any]) -> str:
    """Write plan.json; the lines to print."""
    write_json_atomic(out_dir / "plan.json", estimate)

    def num(x: Any, fmt: str = ",") -> str:
        return "?" if x is None else format(x, fmt)

    e = estimate
    cost = f"${num(e['cost_usd'], ',.2f')} (worst case ${num(e['worst_cost_usd'], ',.2f')})"
    time_s = e["time_s"]
    if time_s is None:
        took = "?"
    elif time_s < 120:
        took = f"{time_s:,.0f} s"
    else:
        took = f"{time_s / 60:,.1f} min" if time_s < 7200 else f"{time_s / 3600:,.1f} h"
    lines = [
        f"forge plan for {out_dir}: nothing sent but the pilot, no row written",
        f"  rows: {num(e['rows'])} ({num(e['rows_to_go'])} to go), {num(e['requests'])} requests",
        f"  prompt tokens: {num(e['prompt_tokens'])} ({num(e['mean_prompt_tokens'])} a request, by "
        f"{e['prompt_tokens_from'] or 'nothing: no tokenizer and no pilot answer'})",
        f"  completion tokens: {num(e['completion_tokens'])} ({num(e['mean_completion_tokens'])} a request over "
        f"{e['pilot_answers']} pilot answers; at most {num(e['max_completion_tokens'])})",
        f"  cost: {cost if e['cost_usd'] is not None else 'set model.price_in_per_mtok / price_out_per_mtok'}",
        f"  time: {took} at {e['in_flight']} in flight ({num(e['mean_latency_s'])} s a request in the pilot)",
        f"  the pilot's answers are in the request cache: the run replays them; details: {out_dir / 'plan.json'}",
    ]
    return "\n".join(lines)
