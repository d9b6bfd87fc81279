"""One forge run: check the run dir, then for each task scan the input, start the engine, drive
the generation and write stats. Every failure a user can cause ends in one clear message."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from rich.logging import RichHandler

from forge.cache import CacheWriteError, RequestCache, check_cache
from forge.card import record_command, write_card
from forge.config import ConfigError, EngineKind, ForgeConfig, ModelConfig, OnChange
from forge.dataset import DatasetError, Source
from forge.engine import ChatClient, Engine, EngineError, compile_cache, open_engine
from forge.engine.capacity import DEFAULT_VLLM_MAX_NUM_SEQS, choose_in_flight
from forge.engine.commands import engine_version
from forge.engine.inprocess import InProcessClient
from forge.generate import Generator
from forge.hub import (
    BackgroundPublisher,
    HubError,
    HubPublisher,
    preflight,
    publish_final,
    repo_url,
    target_from,
)
from forge.locks import RunBusy, check_not_running, check_run_free, run_lock, shard_lock
from forge.output import (
    DATA_SCHEMA,
    REJECT_SCHEMA,
    ChunkWriter,
    OutputError,
    RunChanged,
    check_manifest,
    check_output_dir,
    check_task_input,
    create_output_dir,
    done_keys,
    mark_finished,
    mark_started,
    move_aside,
    prune_rejected,
    record_manifest,
)
from forge.plan import Planner, Scan
from forge.progress import LiveProgress, console, task_progress_path
from forge.prompt import LengthFitter, load_template
from forge.rollout.checks import uses_rollout_path
from forge.rollout.structured import load_schema
from forge.secrets import RedactingFilter, redact, register_config_secrets, register_secret_env
from forge.stats import merge_stats, session_record, write_task_stats
from forge.tiny_model import ensure_tiny_model
from forge.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("forge")
TINY = "forge://tiny-qwen3"
VLLM_ENGINES = (EngineKind.vllm, EngineKind.vllm_async)
GPU_ENGINES = (*VLLM_ENGINES, EngineKind.sglang)


class RunLogHandler(logging.FileHandler):
    """<run dir>/forge.log. A write that fails (disk full) is dropped silently: the failure that
    caused it is reported once, as one line, not as a logging traceback per record."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        pass


def setup_logging(out_dir: Path | None = None, log_name: str = "forge.log") -> None:
    """Rich lines on the terminal; with out_dir, also plain lines in <run dir>/forge.log (added
    only once the run is accepted, so a refused command writes nothing). Secrets masked in both."""
    root = logging.getLogger("forge")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    if sys.stderr.isatty():
        term: logging.Handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
        term.setFormatter(logging.Formatter("%(message)s"))
    else:  # Slurm logs, CI, pipes: unwrapped plain lines
        term = logging.StreamHandler(sys.stderr)
        term.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    term.addFilter(lambda record: not getattr(record, "file_only", False))
    term.addFilter(RedactingFilter())
    root.addHandler(term)
    root.propagate = False
    if out_dir is not None:
        attach_run_log(out_dir, log_name)


def attach_run_log(out_dir: Path, log_name: str = "forge.log") -> Path:
    path = out_dir / log_name
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = RunLogHandler(path)
    plain.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    plain.addFilter(RedactingFilter())
    logging.getLogger("forge").addHandler(plain)
    return path


def save_config(raw: DictConfig | dict, out_dir: Path) -> None:
    data = raw if isinstance(raw, dict) else OmegaConf.to_container(raw, resolve=True, enum_to_str=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(redact(data), sort_keys=False))


def resolve_model(name_or_path: str) -> str:
    if name_or_path == TINY:
        return str(ensure_tiny_model())
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


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


def open_tokenizer(cfg: ForgeConfig, model_path: str) -> Tokenizer | None:
    name = cfg.model.tokenizer or model_path
    try:
        return load_tokenizer(name, cfg.model.revision, cfg.model.trust_remote_code)
    except Exception as exc:  # any loader failure: run on, unmeasured, and say so
        log.warning("prompts are not measured: cannot load tokenizer %r (%s); set model.tokenizer", name, exc)
        return None


def model_context(model_path: str) -> int | None:
    """max_position_embeddings from a local config.json, when neither config nor engine says."""
    path = Path(model_path) / "config.json"
    try:
        return int(json.loads(path.read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class DocProgress:
    """Counts a document done when all its pending rollouts are settled."""

    def __init__(self, pending: dict[str, int], bar: LiveProgress) -> None:
        self.left = dict(pending)
        self.bar = bar

    def __call__(self, key: str, whole: bool = False) -> None:
        n = self.left.get(key)
        if n is None:
            return
        if whole or n <= 1:
            del self.left[key]
            self.bar.advance(docs=1)
        else:
            self.left[key] = n - 1


async def start_engine(engine: Engine, m: ModelConfig) -> dict[str, Any]:
    """Start it; vLLM compiles into the shared cache under its lock. Returns notes for stats."""
    notes: dict[str, Any] = {"engine_version": engine_version(m.engine)}
    if m.engine not in VLLM_ENGINES:
        await engine.start()
        return notes
    path = compile_cache.cache_dir(m.compile_cache_dir)
    with compile_cache.locked(path):
        before = compile_cache.entries(path)
        await engine.start()
        compiled = compile_cache.entries(path) - before
    # warm only if this start compiled nothing new (a new tp/dp or config compiles its own entry)
    return {**notes, "compile_cache": "cold" if compiled or not before else "warm"}


async def size_in_flight(
    cfg: ForgeConfig,
    engine: Engine,
    planner: Planner,
    fitter: LengthFitter,
    m: ModelConfig | None = None,
    queue_share: float = 0.5,
) -> dict[str, Any]:
    """run.max_in_flight, or what the engine's KV cache holds at the expected sequence length
    (of `m`: the model, or a rollout's judge_model)."""
    m = m or cfg.model
    kv_tokens = await engine.kv_capacity_tokens()
    expected = cfg.generation.max_tokens + (planner.mean_prompt_tokens(fitter) or 0)
    seqs = m.max_num_seqs or (DEFAULT_VLLM_MAX_NUM_SEQS if m.engine in VLLM_ENGINES else None)
    in_flight, why = choose_in_flight(
        cfg.run.max_in_flight, kv_tokens, expected, seqs, engine.graph_cap(), m.dp, queue_share
    )
    log.info("in-flight limit %d%s (%s)", in_flight, "" if m is cfg.model else " (judge_model)", why)
    return {"in_flight": in_flight, "in_flight_reason": why, "kv_cache_tokens": kv_tokens}


def make_client(
    cfg: ForgeConfig,
    engine: Engine,
    tokenizer: Tokenizer | None,
    in_flight: int,
    on_retry: Any,
    m: ModelConfig | None = None,
) -> Any:
    """HTTP for server engines; direct calls for the in-process one."""
    m = m or cfg.model
    if m.engine == EngineKind.vllm_async:
        if tokenizer is None:
            raise EngineError("model.engine=vllm_async renders prompts itself and needs the model's tokenizer")
        return InProcessClient(engine, tokenizer, cfg.generation.extra_body.get("chat_template_kwargs"))
    r = cfg.run
    return ChatClient(engine, in_flight, r.request_timeout_s, r.max_retries, r.backoff_s, on_retry=on_retry)


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
            from forge.rollout.task import run_rollout_task

            paths = {"model": model_path} | ({"judge_model": judge_path} if judge_path else {})
            return await run_rollout_task(cfg, task, source, template, paths, wanted)
        return await _run_task(cfg, task, source, template, model_path, wanted)


def budget_for(cfg: ForgeConfig, context: int | None) -> int | None:
    budget = context - cfg.generation.max_tokens if context else None
    if budget is not None and budget <= 0:
        raise ConfigError(f"generation.max_tokens: {cfg.generation.max_tokens} >= the context of {context} tokens")
    return budget


def make_fitter(cfg: ForgeConfig, tokenizer: Tokenizer | None, reported: int | None, model_path: str) -> LengthFitter:
    """The prompt-length fitter: the context is model.max_model_len, else what the engine
    reports, else the model's config.json."""
    context = cfg.model.max_model_len or reported or model_context(model_path)
    template_kwargs = cfg.generation.extra_body.get("chat_template_kwargs")
    return LengthFitter(tokenizer, budget_for(cfg, context), cfg.prompt.on_overlong, template_kwargs)


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
                        client = make_client(cfg, engine, fitter.tok, gen.max_in_flight, gen.stats.on_retry)
                        bar.restart_clock()
                        async with client:
                            gen.client = client
                            gen.on_tokens = lambda n: bar.advance(tokens_out=n)
                            await gen.run(planner.plan(scan.pending, done, fitter, engine.served_model, identity))
                status = "complete"
            except asyncio.CancelledError:
                status = "interrupted"
                raise
            finally:
                await _flush_all(data, rejected)
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


async def _flush_all(*writers: ChunkWriter) -> None:
    """Write what is buffered in every writer; the first failure is raised after trying them all
    (unless an error is already on its way: then it wins, and this one is only logged)."""
    first: BaseException | None = None
    for w in writers:
        try:
            await w.flush()
        except (OSError, OutputError) as exc:
            first = first or exc
    if first is not None:
        if sys.exc_info()[1] is not None:
            log.warning("%s", first)
        else:
            raise first


class GenerationRun:
    """The generate stage as run_forge drives it (forge/stages.py): prompts -> engine -> rows."""

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

    def partial_stats(self) -> None:
        merge_stats(Path(self.cfg.output.dir))

    def finish(self, hub_repo: str | None) -> tuple[dict[str, Any], str]:
        from forge.rollout.columns import harmonize_shards

        out_dir = Path(self.cfg.output.dir)
        harmonize_shards(out_dir)  # a rollout's late-seen column, null in its earlier shards
        stats = merge_stats(out_dir)
        card = write_card(out_dir, hub_repo)
        mark_finished(out_dir, stats)
        line = (
            f"forge: {stats['rows_written']} rows ({stats['documents_written']} documents) in {out_dir / 'data'}; "
            f"{stats['documents_rejected']} documents quarantined in {out_dir / 'rejected'}; "
            f"stats: {out_dir / 'stats.json'}; card: {card}"
        )
        return stats, line


def prepare_run(cfg: ForgeConfig) -> Any:
    """The checks of any stage before a run is accepted (also before a Slurm submission)."""
    from forge.stages import stage_run

    run = stage_run(cfg)
    run.prepare()
    return run


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


def start_fresh(cfg: ForgeConfig, wanted: dict[str, Any], what: str, changed: RunChanged) -> None:
    """output.on_change=fresh: move the changed run aside and start over; else raise `changed`."""
    if cfg.output.on_change != OnChange.fresh or cfg.cluster.task_index is not None:
        raise changed  # a Slurm task never moves the dir its sibling tasks are writing
    out_dir = Path(cfg.output.dir)
    moved = move_aside(out_dir)
    log.warning("output.on_change=fresh: %s moved to %s", what, moved)
    check_manifest(out_dir, wanted)


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


def _merge_quietly(out_dir: Path, run: Any) -> None:
    """stats.json also after a failure or Ctrl-C: what the shards hold so far."""
    if (out_dir / "stats").is_dir():
        try:
            run.partial_stats()
        except Exception as exc:  # never mask the error being reported
            log.warning("could not write stats.json: %s", exc)


def run_forge(
    cfg: ForgeConfig,
    raw: DictConfig | dict,
    log_name: str = "forge.log",
    merge: bool = True,
    overrides: list[str] | None = None,
) -> int:
    """Run the shards of cfg (all, or cluster.task_index) here; returns the exit code. A local
    run holds the run dir's lock (forge/locks.py) from before its checks to its last write."""
    with contextlib.ExitStack() as held:
        return _run_forge(cfg, raw, held, log_name, merge, overrides)


def _run_forge(
    cfg: ForgeConfig,
    raw: DictConfig | dict,
    held: contextlib.ExitStack,
    log_name: str = "forge.log",
    merge: bool = True,
    overrides: list[str] | None = None,
) -> int:
    """Run the shards of cfg (all, or cluster.task_index) here; returns the exit code.

    Nothing is written into the run dir until the run is accepted (output dir usable, input
    and template readable, settings match what the dir holds). A Slurm array task calls this
    for its own shard with its own log and merge=False: the finalize job merges stats once
    every shard is done. `overrides`, when given, are recorded in command.json (the card's
    reproducing command)."""
    out_dir = Path(cfg.output.dir)
    setup_logging()
    register_secret_env(cfg.model.api_key_env)
    if cfg.judge_model is not None:
        register_secret_env(cfg.judge_model.api_key_env)
    register_config_secrets(raw if isinstance(raw, dict) else OmegaConf.to_container(raw, resolve=True))
    register_config_secrets(dataclasses.asdict(cfg))  # a Slurm job's raw config holds env references
    t0 = time.monotonic()
    # a Slurm task (merge=False) never publishes: the monitor and finalize jobs do, once per run
    hub = target_from(cfg.output) if merge else None
    accepted = False
    try:
        check_output_dir(out_dir)
        local = cfg.cluster.task_index is None  # a Slurm task holds only its own shard's lock
        locked = False
        if local:
            check_not_running(out_dir)
            if (out_dir / "state").is_dir():  # else taken once accepted: a refused run creates nothing
                held.enter_context(run_lock(out_dir))
                locked = True
        else:
            check_run_free(out_dir, cfg.cluster.task_index)
        run = prepare_run(cfg)
        if hub:
            preflight(hub)  # a bad token fails here, before any engine starts
        create_output_dir(out_dir)
        if local and not locked:
            held.enter_context(run_lock(out_dir))
        accepted = True
        mark_started(out_dir)  # not a finished input for the next stage until this session finishes
        attach_run_log(out_dir, log_name)
        log.info("=== forge run %s in %s", time.strftime("%Y-%m-%d %H:%M:%S"), out_dir)
        if merge:
            save_config(raw, out_dir)
            if overrides is not None:
                record_command(out_dir, overrides)
        run.start()
        tasks = [cfg.cluster.task_index] if cfg.cluster.task_index is not None else range(cfg.cluster.tasks)
        publishing = BackgroundPublisher(HubPublisher(out_dir, hub)) if hub else contextlib.nullcontext()
        try:
            with publishing:
                for task in tasks:
                    run.run_task(task)
        finally:
            if hasattr(run, "close"):
                run.close()  # a stage's engine (score) stops here, after its last task
    except (ConfigError, DatasetError, RunChanged, EngineError, OutputError, HubError, OSError) as exc:
        if merge and accepted:
            _merge_quietly(out_dir, run)
        message = _one_line(exc)
        log.error("%s", message, extra={"file_only": True})
        head, _, details = message.partition("\n")  # e.g. the engine log's last lines
        print(f"forge: error: {head}", file=sys.stderr)
        if accepted:
            print(f"forge: nothing finished was lost; log: {out_dir / log_name}", file=sys.stderr)
        else:
            print(f"forge: nothing finished was lost; nothing started, nothing in {out_dir} changed", file=sys.stderr)
        if details:
            print("\n".join(f"  | {line}" for line in details.splitlines()), file=sys.stderr)
        user_error = (ConfigError, DatasetError, RunChanged, HubError)
        if isinstance(exc, RunBusy):  # another forge runs it: re-run once that one has ended
            return 1
        return 2 if isinstance(exc, user_error) or (isinstance(exc, OutputError) and not accepted) else 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        if merge and accepted:
            _merge_quietly(out_dir, run)
        log.warning("interrupted", extra={"file_only": True})
        print("forge: interrupted: finished rows are saved; re-run the same command to resume", file=sys.stderr)
        return 130
    log.info("done in %.1f s", time.monotonic() - t0)
    if not merge:
        return 0
    try:
        _, summary = run.finish(hub.repo if hub else None)  # marks the dir finished (state/finished.json)
        if cfg.cluster.task_index is not None:  # one shard's finish does not make the dir whole
            mark_started(out_dir)
    except (OSError, OutputError) as exc:
        print(f"forge: error: {_one_line(exc)}", file=sys.stderr)
        print(f"forge: every row is in {out_dir / 'data'}; re-run the same command to write the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "forge: interrupted: every row is saved; re-run the same command to write stats and card", file=sys.stderr
        )
        return 130
    print(summary)
    if hub:
        try:
            publish_final(out_dir, hub)
        except HubError as exc:
            log.error("%s", exc, extra={"file_only": True})
            print(f"forge: error: {exc}", file=sys.stderr)
            return 1
        print(f"forge: published to {repo_url(hub.repo)}")
    return 0


def run_step(cfg: ForgeConfig, raw: DictConfig | dict, step: str, task: int, log_name: str) -> int:
    """One task of a step before the shards (a Slurm step array's task); returns the exit code."""
    out_dir = Path(cfg.output.dir)
    setup_logging()
    register_config_secrets(raw if isinstance(raw, dict) else OmegaConf.to_container(raw, resolve=True))
    try:
        check_run_free(out_dir, task)  # a local run of this dir holds run.lock: not beside it
        run = prepare_run(cfg)
        attach_run_log(out_dir, log_name)
        log.info("=== forge step %s, task %d, in %s", step, task, out_dir)
        run.run_step(step, task)
    except (ConfigError, DatasetError, RunChanged, OutputError, OSError, RuntimeError) as exc:
        log.error("%s", _one_line(exc), extra={"file_only": True})
        print(f"forge: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"forge: interrupted: step {step} task {task}; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


def _one_line(exc: BaseException) -> str:
    """An error as one line: forge's own messages as they are; an OSError with its path and
    cause (`cannot write /x/y: No space left on device`), and what to do."""
    if isinstance(exc, OSError) and not isinstance(exc, CacheWriteError):
        what = f"{exc.filename}: " if exc.filename else ""
        full = exc.errno == errno.ENOSPC
        hint = "free some space and re-run the same command to resume" if full else "re-run the same command to resume"
        text = f"{what}{exc.strerror or exc}; {hint}"
    else:
        text = str(exc)
        if isinstance(exc, CacheWriteError) and "No space left" in text:
            text += "; free some space and re-run the same command to resume"
    return text
