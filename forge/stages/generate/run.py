"""The generate stage: for each task scan the input, start the engine, drive the requests and
write rows, stats and the card. The run lifecycle around it is forge/run/runner.py's."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from pathlib import Path
from typing import Any

from forge.config import ForgeConfig
from forge.engine import Engine, open_engine
from forge.engine.pricing import BudgetReached, Prices
from forge.engine.tiny_model import TINY, resolve_model
from forge.engine.tokenizer import Tokenizer
from forge.io.dataset import Source
from forge.io.secrets import redact
from forge.run.card import write_card
from forge.run.locks import shard_lock
from forge.run.output import (
    DATA_SCHEMA,
    REJECT_SCHEMA,
    ChunkWriter,
    OutputError,
    RunChanged,
    check_manifest,
    check_task_input,
    done_keys,
    mark_finished,
    prune_rejected,
    record_manifest,
    start_fresh,
)
from forge.run.progress import LiveProgress, task_progress_path
from forge.stages.generate.cache import RequestCache, check_cache
from forge.stages.generate.generator import Generator
from forge.stages.generate.plan import Planner, Scan
from forge.stages.generate.prompt import load_template
from forge.stages.generate.rollout.checks import uses_rollout_path
from forge.stages.generate.rollout.structured import load_schema
from forge.stages.generate.stats import merge_stats, session_record, write_task_stats
from forge.stages.generate.task_parts import (
    GPU_ENGINES,
    DocProgress,
    engine_load,
    flush_all,
    make_client,
    make_fitter,
    open_tokenizer,
    size_in_flight,
    start_engine,
    task_budget,
)

log = logging.getLogger("forge")


def manifest(cfg: ForgeConfig, source: Source) -> dict[str, Any]:
    """What must not change under an existing output dir (else results would mix)."""
    m = cfg.model
    return redact(
        {
            "version": 1,
            "dataset": source.describe(),
            "sharding": {"tasks": cfg.cluster.tasks, "examples_per_chunk": cfg.output.examples_per_chunk},
            "generation": {
                "model": m.name_or_path,
                "revision": m.revision,
                "engine": m.engine.value,
                "max_model_len": m.max_model_len,
                "prompt": {
                    k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(cfg.prompt).items()
                },
                "params": generation_params(cfg),
            },
            **rollout_manifest(cfg),
        }
    )


def generation_params(cfg: ForgeConfig) -> dict[str, Any]:
    """generation.* as pinned; the structured-output keys only when used (older run dirs match)."""
    params = dataclasses.asdict(cfg.generation)
    if params["json_schema"] is None:
        del params["json_schema"], params["json_retries"]
    else:
        params["json_schema"] = load_schema(params["json_schema"]).schema
    return params


def rollout_manifest(cfg: ForgeConfig) -> dict[str, Any]:
    """What a rollout run pins beyond generation: the function, its knobs and the judge model."""
    if not uses_rollout_path(cfg):
        return {}
    pinned: dict[str, Any] = {"rollout": dataclasses.asdict(cfg.rollout)}
    pinned["rollout"].pop("max_active")  # how fast, not what
    pinned["rollout"].pop("timeout_s")  # how patient, not what: its quarantines are retryable
    j = cfg.judge_model
    if j is not None:
        pinned["judge_model"] = {"model": j.name_or_path, "revision": j.revision, "engine": j.engine.value}
    return pinned


async def run_task(
    cfg: ForgeConfig,
    task: int,
    source: Source,
    template: str | None,
    model_path: str,
    wanted: dict[str, Any],
    judge_path: str | None = None,
) -> str:
    with shard_lock(Path(cfg.output.dir), task):
        if uses_rollout_path(cfg):
            from forge.stages.generate.rollout.task import run_rollout_task

            paths = {"model": model_path} | ({"judge_model": judge_path} if judge_path else {})
            return await run_rollout_task(cfg, task, source, template, paths, wanted)
        return await _run_task(cfg, task, source, template, model_path, wanted)


async def replay_cached(
    cfg: ForgeConfig,
    gen: Generator,
    planner: Planner,
    scan: Scan,
    done: set[tuple[str, int]],
    tokenizer: Tokenizer | None,
    engine: Engine,
    identity: dict[str, Any],
    model_path: str,
) -> None:
    """Answers cached but not in shards (a deleted shard, a kill between cache and shard) are
    written before any engine starts; if that leaves nothing to send, no engine starts at all."""
    fitter = make_fitter(cfg, tokenizer, None, model_path)
    settled = await gen.replay(planner.plan(scan.pending, done, fitter, engine.served_model, identity))
    settle_replayed(settled, scan.pending, done)
    if not scan.pending:
        log.info("every remaining row was replayed from the request cache; no engine started")


def settle_replayed(settled: list[tuple[str, int]], pending: dict[str, int], done: set[tuple[str, int]]) -> None:
    """Take rows settled from the cache (or rejected) before the engine started out of `pending`."""
    for key, rollout in settled:
        if key not in pending:
            continue
        if rollout < 0:
            del pending[key]
            continue
        done.add((key, rollout))
        pending[key] -= 1
        if pending[key] <= 0:
            del pending[key]


async def _run_task(
    cfg: ForgeConfig, task: int, source: Source, template: str | None, model_path: str, wanted: dict[str, Any]
) -> str:
    out_dir = Path(cfg.output.dir)
    tasks = cfg.cluster.tasks
    label = f"task {task}" if tasks > 1 else "forge"
    data_dir, rej_dir = out_dir / "data", out_dir / "rejected"
    done, whole = done_keys(data_dir, rej_dir, task, cfg.run.retry_failed)
    planner = Planner(cfg, source, task, tasks, template)
    scan = planner.scan(done, whole)
    # the input reads with these settings: only now are they pinned (a typo pins nothing)
    record_manifest(out_dir, wanted)
    check_task_input(out_dir, task, {"rows": scan.rows, "fingerprint": f"{scan.fingerprint:016x}"})
    cache_path = out_dir / "cache" / f"task_{task:05d}.sqlite"
    await asyncio.to_thread(check_cache, cache_path)  # a damaged cache is moved aside before any engine starts
    finished_docs = scan.rows - len(scan.pending)
    log.info("%s: %d documents, %d already done, %d requests to go", label, scan.rows, finished_docs, scan.units)
    if scan.rows == 0:
        log.warning(
            "%s: the input has no rows (dataset.name=%s, dataset.max_examples=%s)",
            label,
            cfg.dataset.name,
            cfg.dataset.max_examples,
        )
    m = cfg.model
    gpus = m.tp * m.pp * m.dp if m.engine in GPU_ENGINES else 0
    if not scan.pending:
        prune_rejected(rej_dir, data_dir, task)
        LiveProgress(label, scan.rows, scan.rows, False, 0, task_progress_path(out_dir, task)).finish("complete")
        write_task_stats(
            out_dir, task, scan.rows, session_record(Generator.empty_stats(), None, None, 0, gpus, "complete")
        )
        return "complete"

    engine = open_engine(m, model_path, out_dir / "logs" / f"engine_task{task:05d}.log", cfg.generation.seed)
    tokenizer_job = asyncio.create_task(asyncio.to_thread(open_tokenizer, cfg, model_path))
    status = "failed"
    gen: Generator | None = None
    notes: dict[str, Any] = {}
    identity = {
        "model": model_path if m.name_or_path == TINY else m.name_or_path,
        "revision": m.revision,
        "engine": m.engine.value,
    }
    row_fields = {"model": m.name_or_path, "revision": m.revision, "engine": m.engine.value}
    r = cfg.run
    try:
        data = ChunkWriter(data_dir, task, DATA_SCHEMA, cfg.output.examples_per_chunk)
        rejected = ChunkWriter(rej_dir, task, REJECT_SCHEMA, cfg.output.examples_per_chunk)
        async with RequestCache(cache_path) as cache:
            bar = LiveProgress(
                label, scan.rows, finished_docs, r.progress, r.log_every_s, task_progress_path(out_dir, task)
            )
            gen = Generator(None, cache, data, rejected, row_fields, 1, DocProgress(scan.pending, bar))
            gen.prices = Prices.of(m)
            gen.on_cost = bar.spend
            try:
                with bar:
                    if await cache.any():
                        tokenizer = await tokenizer_job
                        await replay_cached(cfg, gen, planner, scan, done, tokenizer, engine, identity, model_path)
                    if scan.pending:
                        notes.update(await start_engine(engine, m))
                        fitter = make_fitter(cfg, await tokenizer_job, engine.reported_max_model_len, model_path)
                        notes.update(await size_in_flight(cfg, engine, planner, fitter))
                        gen.max_in_flight = notes["in_flight"]
                        budget = task_budget(cfg, out_dir, task)
                        client = make_client(
                            cfg,
                            engine,
                            fitter.tok,
                            gen.max_in_flight,
                            gen.stats.on_retry,
                            budget=budget,
                            batch_dir=out_dir / "state" / f"batches_{task:05d}",
                        )
                        bar.restart_clock()
                        async with client:
                            gen.client = client
                            gen.on_tokens = lambda n: bar.advance(tokens_out=n)
                            try:
                                await gen.run(planner.plan(scan.pending, done, fitter, engine.served_model, identity))
                            finally:
                                notes.update(engine_load(client))
                status = "complete"
            except asyncio.CancelledError:
                status = "interrupted"
                raise
            except BudgetReached:
                status = "budget reached"
                raise
            finally:
                await flush_all(data, rejected)
    finally:
        if not tokenizer_job.done():
            tokenizer_job.cancel()
        await engine.stop()
        try:  # also after a failure: rejected/ never holds a row twice or one since answered
            prune_rejected(rej_dir, data_dir, task)
        except (OSError, OutputError) as exc:
            log.warning("rejected/ of task %d not tidied: %s", task, exc)
        stats = gen.stats if gen else Generator.empty_stats()
        record = session_record(stats, engine.startup_s, engine.ready_at, engine.restarts, gpus, status)
        try:
            write_task_stats(out_dir, task, scan.rows, {**record, **notes})
        except (OSError, OutputError) as exc:  # never mask the error being reported
            log.warning("stats of task %d not written: %s", task, exc)
    return status


class GenerationRun:
    """The generate stage as run_forge drives it (forge/run/batch_run.py): prompts -> engine -> rows."""

    def __init__(self, cfg: ForgeConfig) -> None:
        self.cfg = cfg

    def prepare(self) -> None:
        self.source, self.template, self.wanted = prepare_generation(self.cfg)

    def start(self) -> None:
        self.model_path = resolve_model(self.cfg.model.name_or_path)
        judge = self.cfg.judge_model
        self.judge_path = resolve_model(judge.name_or_path) if judge is not None else None

    def run_task(self, task: int) -> None:
        cfg = self.cfg
        args = (cfg, task, self.source, self.template, self.model_path, self.wanted, self.judge_path)
        try:
            _run_async(run_task(*args))
        except RunChanged as exc:
            start_fresh(cfg, self.wanted, "input changed; previous results", exc)
            _run_async(run_task(*args))

    def plan(self) -> int:
        """run.plan=true: the estimate, printed and in plan.json; nothing else runs."""
        from forge.stages.generate.estimate import estimate_run, report

        estimate = _run_async(estimate_run(self.cfg, self.source, self.template, self.model_path))
        print(report(Path(self.cfg.output.dir), estimate))
        return 0

    def partial_stats(self) -> None:
        merge_stats(Path(self.cfg.output.dir))

    @staticmethod
    def finish_dir(out_dir: Path, hub_repo: str | None) -> dict[str, Any]:
        """stats.json and the card once every shard is done (also Slurm's finalize job)."""
        from forge.stages.generate.rollout.columns import harmonize_shards

        harmonize_shards(out_dir)  # a rollout's late-seen column, null in its earlier shards
        stats = merge_stats(out_dir)
        write_card(out_dir, hub_repo)
        mark_finished(out_dir, stats)
        return stats

    def finish(self, hub_repo: str | None) -> tuple[dict[str, Any], str]:
        out_dir = Path(self.cfg.output.dir)
        stats = self.finish_dir(out_dir, hub_repo)
        card = out_dir / "README.md"
        line = (
            f"forge: {stats['rows_written']} rows ({stats['documents_written']} documents) in {out_dir / 'data'}; "
            f"{stats['documents_rejected']} documents quarantined in {out_dir / 'rejected'}; "
            f"stats: {out_dir / 'stats.json'}; card: {card}"
        )
        return stats, line


def prepare_generation(cfg: ForgeConfig) -> tuple[Source, str | None, dict[str, Any]]:
    """Open the input and template, and check the run dir was made by the same settings
    (or move it aside with output.on_change=fresh). Writes nothing: a refused command leaves
    the run dir as it was. Raises the errors run_forge reports."""
    out_dir = Path(cfg.output.dir)
    source = Source(cfg.dataset, all_columns=uses_rollout_path(cfg))  # a rollout sees the whole row
    if source.files:  # a missing column or an unreadable local file stops us here, not mid-run
        next(iter(source.rows()), None)
    template = load_template(cfg.prompt)
    wanted = manifest(cfg, source)
    try:
        check_manifest(out_dir, wanted)
    except RunChanged as exc:
        start_fresh(cfg, wanted, "previous results", exc)
    return source, template, wanted


def _run_async(coro: Any) -> Any:
    """asyncio.run, with SIGTERM handled like Ctrl-C (cancel, flush, stop the engine)."""

    async def main() -> Any:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await coro

    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:
        return asyncio.run(main())
