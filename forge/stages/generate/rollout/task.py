"""One task of a rollout run: what forge/stages/generate/run.py does for a generation task (scan, pin the
settings, check the cache, start the engine, size the in-flight limit, stats), with the
rollout driver in place of the one-request generator and, when configured, a second engine
(judge_model) beside the first."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from forge.config import ForgeConfig, gpus_per_task
from forge.engine import Engine, open_engine
from forge.engine.config import ModelConfig
from forge.engine.pricing import BudgetReached, Prices
from forge.engine.tiny_model import TINY
from forge.run.output import REJECT_SCHEMA, ChunkWriter, check_task_input, done_keys, prune_rejected, record_manifest
from forge.run.progress import LiveProgress, task_progress_path
from forge.schema import ConfigError
from forge.stages.generate import task_parts as parts
from forge.stages.generate.cache import RequestCache, check_cache
from forge.stages.generate.generator import SessionStats
from forge.stages.generate.plan import Planner
from forge.stages.generate.rollout.calls import Calls, Lane
from forge.stages.generate.rollout.checks import rollout_fn, setup_fn
from forge.stages.generate.rollout.columns import ColumnPin, parse_declared
from forge.stages.generate.rollout.context import Context
from forge.stages.generate.rollout.driver import RolloutDriver, RolloutWriter
from forge.stages.generate.rollout.slots import Slots
from forge.stages.generate.rollout.structured import load_schema
from forge.stages.generate.stats import session_record, write_task_stats

log = logging.getLogger("forge.stages.generate.rollout")


def declared_columns(cfg: ForgeConfig, fn: Any) -> dict[str, Any]:
    """A ready rollout's own column types, the JSON schema's fields (chat), then rollout.columns."""
    kinds: dict[str, Any] = dict(getattr(fn, "columns", {}) or {})
    schema = load_schema(cfg.generation.json_schema)
    if schema is not None and cfg.rollout.fn.endswith(":chat"):
        from forge.stages.generate.rollout.library import json_field

        for name, kind in schema.columns().items():
            kinds.setdefault(json_field(name, kinds), kind)
    kinds.update(parse_declared(cfg.rollout.columns))
    return kinds


def own_tokenizer(m: ModelConfig, model_path: str) -> Any:
    """The judge's own tokenizer and chat template (an in-process judge renders its prompts)."""
    if m.engine.value != "vllm_async":
        return None
    from forge.engine.tokenizer import load_tokenizer

    return load_tokenizer(m.tokenizer or model_path, m.revision, m.trust_remote_code)


def identity_of(m: ModelConfig, model_path: str, tiny: str) -> dict[str, Any]:
    return {
        "model": model_path if m.name_or_path == tiny else m.name_or_path,
        "revision": m.revision,
        "engine": m.engine.value,
    }


async def run_rollout_task(
    cfg: ForgeConfig,
    task: int,
    source: Any,
    template: str | None,
    paths: dict[str, str],
    wanted: dict[str, Any],
) -> str:
    """paths: {"model": resolved path, "judge_model": resolved path (when configured)}."""

    out_dir = Path(cfg.output.dir)
    label = f"task {task}" if cfg.cluster.tasks > 1 else "forge"
    data_dir, rej_dir = out_dir / "data", out_dir / "rejected"
    done, whole = done_keys(data_dir, rej_dir, task, cfg.run.retry_failed)
    planner = Planner(cfg, source, task, cfg.cluster.tasks, template, whole_rows=True)
    scan = planner.scan(done, whole)
    record_manifest(out_dir, wanted)
    check_task_input(out_dir, task, {"rows": scan.rows, "fingerprint": f"{scan.fingerprint:016x}"})
    cache_path = out_dir / "cache" / f"task_{task:05d}.sqlite"
    await asyncio.to_thread(check_cache, cache_path)
    finished = scan.rows - len(scan.pending)
    log.info(
        "%s: %d documents, %d already done, %d rollouts of %s to go",
        label,
        scan.rows,
        finished,
        scan.units,
        cfg.rollout.fn,
    )
    models = {"model": cfg.model} | ({"judge_model": cfg.judge_model} if cfg.judge_model is not None else {})
    gpus = gpus_per_task(cfg)
    stats = SessionStats()
    if not scan.pending:
        prune_rejected(rej_dir, data_dir, task)
        LiveProgress(label, scan.rows, scan.rows, False, 0, task_progress_path(out_dir, task)).finish("complete")
        write_task_stats(out_dir, task, scan.rows, session_record(stats, None, None, 0, gpus, "complete"))
        return "complete"

    fn = rollout_fn(cfg.rollout)
    engines: dict[str, Engine] = {
        name: open_engine(
            m,
            paths[name],
            out_dir / "logs" / f"engine{'' if name == 'model' else '_judge'}_task{task:05d}.log",
            cfg.generation.seed,
        )
        for name, m in models.items()
    }
    tokenizer_job = asyncio.create_task(asyncio.to_thread(parts.open_tokenizer, cfg, paths["model"]))
    columns = ColumnPin(out_dir / "state", declared_columns(cfg, fn))
    schema = load_schema(cfg.generation.json_schema)
    status, notes = "failed", {"rollout_fn": cfg.rollout.fn}
    ctx: Context | None = None
    main = engines["model"]
    r = cfg.run
    try:
        data = RolloutWriter(data_dir, task, columns, cfg.output.examples_per_chunk)
        rejected = ChunkWriter(rej_dir, task, REJECT_SCHEMA, cfg.output.examples_per_chunk)
        async with RequestCache(cache_path) as cache:
            bar = LiveProgress(label, scan.rows, finished, r.progress, r.log_every_s, task_progress_path(out_dir, task))
            try:
                with bar:
                    for name, m in models.items():  # one after the other: vLLM compiles under a file lock
                        started = await parts.start_engine(engines[name], m)
                        if name == "model":
                            notes.update(started)
                    fitter = parts.make_fitter(cfg, await tokenizer_job, main.reported_max_model_len, paths["model"])
                    lanes: dict[str, Lane] = {}
                    budget = parts.task_budget(cfg, out_dir, task)  # shared by the model and the judge
                    async with AsyncExitStack() as stack:
                        for name, m in models.items():
                            # a full batch's worth queued in the engine: dependent steps' answers come
                            # in bursts, and the next requests exist only once a burst is processed
                            sized = await parts.size_in_flight(cfg, engines[name], planner, fitter, m, 1.0)
                            notes[f"{name}_in_flight" if name != "model" else "in_flight"] = sized["in_flight"]
                            tok = fitter.tok
                            if name != "model":  # an in-process judge renders with its own template
                                tok = await asyncio.to_thread(own_tokenizer, m, paths[name])
                            client = parts.make_client(
                                cfg,
                                engines[name],
                                tok,
                                sized["in_flight"],
                                stats.on_retry,
                                m,
                                continue_prompts=True,
                                budget=budget,
                                batch_dir=out_dir / "state" / f"batches_{name}_{task:05d}",
                            )
                            lanes[name] = Lane(
                                name,
                                engines[name].served_model,
                                identity_of(m, paths[name], TINY),
                                cfg.generation,
                                m.engine,
                                schema if name == "model" else None,  # the schema shapes the model's answers
                                await stack.enter_async_context(client),
                                Slots(sized["in_flight"]),
                                sized["in_flight"],
                                prices=Prices.of(m),
                            )
                        ctx = Context(cfg, template, fitter)
                        try:
                            await ctx.setup(setup_fn(cfg.rollout))
                        except Exception as exc:
                            raise ConfigError(f"rollout.setup raised {type(exc).__name__}: {exc}") from exc
                        calls = Calls(
                            cache,
                            lanes,
                            stats,
                            cache_was_empty=not await cache.any(),
                            later_steps_first=cfg.rollout.later_steps_first,
                        )
                        calls.on_tokens = lambda n: bar.advance(tokens_out=n)
                        calls.on_cost = bar.spend
                        active = cfg.rollout.max_active or 2 * sum(lane.in_flight for lane in lanes.values())
                        notes["max_active"] = active
                        log.info("%s: up to %d rollouts at once", label, active)
                        row_fields = {
                            "model": cfg.model.name_or_path,
                            "revision": cfg.model.revision,
                            "engine": cfg.model.engine.value,
                        }
                        driver = RolloutDriver(
                            fn,
                            cfg.rollout.fn,
                            ctx,
                            calls,
                            data,
                            rejected,
                            row_fields,
                            parts.DocProgress(scan.pending, bar),
                        )
                        bar.restart_clock()
                        try:
                            await driver.run(planner.rollouts(scan.pending, done), active)
                        finally:
                            notes.update(parts.engine_load(lanes["model"].client))
                status = "complete"
            except asyncio.CancelledError:
                status = "interrupted"
                raise
            except BudgetReached:
                status = "budget reached"
                raise
            finally:
                await parts.flush_all(data, rejected)
    finally:
        if ctx is not None:
            ctx.close()
        if not tokenizer_job.done():
            tokenizer_job.cancel()
        for engine in engines.values():
            await engine.stop()
        try:
            prune_rejected(rej_dir, data_dir, task)
        except Exception as exc:  # noqa: BLE001 (never mask the error being reported)
            log.warning("rejected/ of task %d not tidied: %s", task, exc)
        record = session_record(stats, main.startup_s, main.ready_at, main.restarts, gpus, status)
        try:
            write_task_stats(out_dir, task, scan.rows, {**record, **notes})
        except Exception as exc:  # noqa: BLE001
            log.warning("stats of task %d not written: %s", task, exc)
    return status
