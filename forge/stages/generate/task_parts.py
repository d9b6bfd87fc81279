"""The parts of a generation task that a rollout task shares (forge/stages/generate/run.py,
forge/stages/generate/rollout/task.py): engine start, in-flight sizing, the client, the prompt
fitter, progress per document, flushing the writers."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from forge.config import ConfigError, EngineKind, ForgeConfig, ModelConfig
from forge.engine import ChatClient, Engine, EngineError, compile_cache
from forge.engine.adaptive import AdaptiveLimit
from forge.engine.capacity import DEFAULT_VLLM_MAX_NUM_SEQS, choose_in_flight
from forge.engine.commands import engine_version
from forge.engine.inprocess import InProcessClient
from forge.engine.pricing import Budget, BudgetedClient, Prices, bytes_upper_bound
from forge.engine.tiny_model import resolve_model
from forge.engine.tokenizer import Tokenizer, load_tokenizer
from forge.run.output import (
    ChunkWriter,
    OutputError,
)
from forge.run.progress import LiveProgress
from forge.stages.generate.plan import Planner
from forge.stages.generate.prompt import LengthFitter

log = logging.getLogger("forge")
VLLM_ENGINES = (EngineKind.vllm, EngineKind.vllm_async)
GPU_ENGINES = (*VLLM_ENGINES, EngineKind.sglang)
BATCH_ENGINES = (EngineKind.openai_batch, EngineKind.anthropic_batch)
ADAPTIVE_START = 16  # adaptive concurrency's first limit: moderate; it doubles per round trip from there


def open_tokenizer(cfg: ForgeConfig, model_path: str) -> Tokenizer | None:
    name = resolve_model(cfg.model.tokenizer) if cfg.model.tokenizer else model_path  # forge://tiny-qwen3 too
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
    if m.engine in BATCH_ENGINES:  # a whole batch is gathered before any answer comes
        limit = cfg.run.max_in_flight or m.batch_size
        why = "run.max_in_flight" if cfg.run.max_in_flight else f"{m.name_or_path}: model.batch_size"
        log.info("in-flight limit %d (%s)", limit, why)
        return {"in_flight": limit, "in_flight_reason": why, "kv_cache_tokens": None}
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
    continue_prompts: bool = False,
    budget: Budget | None = None,
    batch_dir: Path | None = None,
) -> Any:
    """HTTP for server engines; direct calls for the in-process one (continue_prompts: a rollout's
    later steps reuse its earlier answers' token ids, forge/engine/continuation.py)."""
    m = m or cfg.model
    if m.engine == EngineKind.vllm_async:
        if tokenizer is None:
            raise EngineError("model.engine=vllm_async renders prompts itself and needs the model's tokenizer")
        kwargs = cfg.generation.extra_body.get("chat_template_kwargs")
        client: Any = InProcessClient(engine, tokenizer, kwargs, continue_prompts)
    elif m.engine in BATCH_ENGINES:
        from forge.engine.anthropic_batch import AnthropicBatchClient
        from forge.engine.batch import BatchClient

        kind = AnthropicBatchClient if m.engine == EngineKind.anthropic_batch else BatchClient
        state = batch_dir or Path(cfg.output.dir) / "state" / "batches"
        client = kind(engine, state, m.batch_size, m.batch_poll_s, m.batch_window, cfg.run.max_retries)
    else:
        r = cfg.run
        adaptive = None
        if r.adaptive_concurrency or (r.adaptive_concurrency is None and m.engine == EngineKind.endpoint):
            adaptive = AdaptiveLimit(start=min(in_flight, ADAPTIVE_START), ceiling=in_flight)
        client = ChatClient(engine, in_flight, r.request_timeout_s, r.max_retries, r.backoff_s, on_retry, adaptive)
    prices = Prices.of(m)
    if budget is None or prices is None:
        return client
    return BudgetedClient(client, budget, prices, prompt_counter(tokenizer))


def prompt_counter(tok: Tokenizer | None) -> Any:
    """Prompt tokens of a request's messages, for the budget: the model's tokenizer, else an upper bound."""

    def count(messages: list[dict[str, Any]]) -> int:
        if tok is not None:
            try:
                return len(tok.encode(tok.render(messages)))
            except Exception:  # a template that refuses these messages: the engine will say so
                pass
        return bytes_upper_bound(messages)

    return count


def task_budget(cfg: ForgeConfig, out_dir: Path, task: int) -> Budget | None:
    """run.budget_usd's share for this task, less what its earlier sessions spent."""
    if cfg.run.budget_usd is None:
        return None
    from forge.stages.generate.stats import spent_usd

    return Budget(cfg.run.budget_usd / max(cfg.cluster.tasks, 1), spent_usd(out_dir, task))


def engine_load(client: Any) -> dict[str, Any]:
    """For stats: how full the in-process engine was kept (forge/engine/inprocess.py EngineLoad),
    or where adaptive concurrency went (forge/engine/adaptive.py)."""
    notes: dict[str, Any] = {}
    for part in (getattr(client, "load", None), getattr(client, "adaptive", None)):
        if part is not None:
            notes.update(part.notes())
    batch = getattr(client, "batch_notes", None) or (client.notes if hasattr(client, "batches") else None)
    if batch is not None:
        notes.update(batch())
    return notes


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


async def flush_all(*writers: ChunkWriter) -> None:
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
