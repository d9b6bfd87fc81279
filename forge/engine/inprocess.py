"""vLLM's AsyncLLM inside the forge process (`model.engine=vllm_async`).

No HTTP server, no JSON, no server-side chat templating: forge renders and tokenizes each
prompt itself and hands token ids to the engine, which asks for final outputs only. This is
what gets forge within a few percent of raw offline `LLM.generate`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from forge.engine.capacity import DEFAULT_VLLM_MAX_NUM_SEQS
from forge.engine.client import Completion, RequestRejected
from forge.engine.commands import missing_engine_message
from forge.engine.config import EngineKind, ModelConfig
from forge.engine.continuation import Continuations
from forge.engine.server import Engine, EngineError
from forge.engine.tokenizer import Tokenizer

log = logging.getLogger("forge.engine")
SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "ignore_eos",
    "min_tokens",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop_token_ids",
    "skip_special_tokens",
    "logit_bias",
)


def priority_scheduling(m: ModelConfig) -> bool:
    """Whether the engine orders its waiting requests by priority: then a rollout's later steps
    jump the engine's queue too, not only forge's (forge/stages/generate/rollout/slots.py)."""
    args = {k.replace("-", "_"): v for k, v in m.engine_args.items()}
    return str(args.get("scheduling_policy", "fcfs")) == "priority"


def engine_kwargs(m: ModelConfig, model_path: str, seed: int | None) -> dict[str, Any]:
    """AsyncEngineArgs keywords from conf/model (the same knobs `vllm serve` gets as flags)."""
    kw: dict[str, Any] = {
        "model": model_path,
        "served_model_name": m.served_name or m.name_or_path,
        "tensor_parallel_size": m.tp,
        "pipeline_parallel_size": m.pp,
        "data_parallel_size": m.dp,
        "trust_remote_code": m.trust_remote_code,
        # per-step stat logging costs throughput; offline LLM() turns it off too
        "disable_log_stats": True,
    }
    optional = {
        "revision": m.revision,
        "max_model_len": m.max_model_len,
        "gpu_memory_utilization": m.gpu_memory_utilization,
        "max_num_seqs": m.max_num_seqs or DEFAULT_VLLM_MAX_NUM_SEQS,
        "max_num_batched_tokens": m.max_num_batched_tokens,
        "speculative_config": m.speculative,
        "kv_cache_dtype": m.kv_cache_dtype,
        "quantization": m.quantization,
        "load_format": m.load_format,
        "seed": seed,
    }
    kw.update({k: v for k, v in optional.items() if v is not None})
    kw.update({k.replace("-", "_"): v for k, v in m.engine_args.items()})
    return kw


class VllmInProcess(Engine):
    kind = EngineKind.vllm_async

    def __init__(self, model: ModelConfig, model_path: str, seed: int | None) -> None:
        super().__init__(model, model.served_name or model.name_or_path)
        self.model_path = model_path
        self.seed = seed
        self.llm: Any = None
        self.defaults: dict[str, Any] = {}

    async def start(self) -> None:
        t0 = time.monotonic()
        log.info("starting vLLM AsyncLLM in-process for %s", self.model_path)
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ModuleNotFoundError as exc:
            if exc.name != "vllm":
                raise EngineError(f"model.engine=vllm_async: cannot import vllm ({exc})") from exc
            raise EngineError(missing_engine_message(EngineKind.vllm_async, "vllm")) from None
        except ImportError as exc:  # a broken install (a torch mismatch, say): its own words
            raise EngineError(f"model.engine=vllm_async: cannot import vllm ({exc})") from exc
        try:
            args = AsyncEngineArgs(**engine_kwargs(self.model, self.model_path, self.seed))
            self.llm = AsyncLLM.from_engine_args(args)
        except Exception as exc:  # vLLM raises many types on bad config / OOM
            raise EngineError(f"vLLM failed to start: {exc.__class__.__name__}: {exc}") from exc
        cfg = self.llm.vllm_config
        self.reported_max_model_len = cfg.model_config.max_model_len
        try:  # the model's generation_config defaults, as `vllm serve` applies them
            self.defaults = dict(cfg.model_config.get_diff_sampling_param())
        except Exception:
            self.defaults = {}
        self.startup_s = time.monotonic() - t0
        self.ready_at = time.monotonic()
        log.info("engine ready in %.1f s (in-process)", self.startup_s)
        self._ready.set()

    def graph_cap(self) -> int | None:
        compilation = self.llm.vllm_config.compilation_config
        cap = getattr(compilation, "max_cudagraph_capture_size", None)
        sizes = getattr(compilation, "cudagraph_capture_sizes", None)
        return int(cap) if cap else (max(sizes) if sizes else None)

    async def kv_capacity_tokens(self) -> int | None:
        cache = self.llm.vllm_config.cache_config
        if cache.num_gpu_blocks and cache.block_size:
            return int(cache.num_gpu_blocks * cache.block_size)
        return None

    async def stop(self) -> None:
        await super().stop()
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None


class EngineLoad:
    """How full forge kept the engine: the time-weighted mean of requests inside it, the time it
    held fewer than a full batch (max_num_seqs) while forge had any in it, the Python time
    forge spent building prompts, and the CPU time of the event loop's thread over the window
    (vLLM's output handling and detokenization run there too: near 1.0 of the window, the loop is
    saturated and answers are noticed late). A few clock reads per request: cheap enough to keep on."""

    def __init__(self, full_batch: int) -> None:
        self.full_batch = full_batch
        self.inside = 0
        self.since = 0.0
        self.first: float | None = None
        self.area = 0.0  # requests x seconds
        self.below_full_s = 0.0
        self.prompt_s = 0.0
        self.cpu_first = self.cpu_last = 0.0  # time.thread_time() of the loop's thread

    def change(self, delta: int) -> None:
        now = time.monotonic()
        self.cpu_last = time.thread_time()
        if self.first is None:
            self.first = now
            self.cpu_first = self.cpu_last
        elif self.inside:
            self.area += self.inside * (now - self.since)
            if self.inside < self.full_batch:
                self.below_full_s += now - self.since
        self.inside += delta
        self.since = now

    def notes(self) -> dict[str, Any]:
        window = (self.since - self.first) if self.first is not None else 0.0
        return {
            "engine_requests_mean": round(self.area / window, 1) if window else None,
            "engine_below_full_batch_s": round(self.below_full_s, 2),
            "engine_window_s": round(window, 2),
            "prompt_build_s": round(self.prompt_s, 2),
            "loop_cpu_s": round(self.cpu_last - self.cpu_first, 2),
            "loop_busy": round((self.cpu_last - self.cpu_first) / window, 3) if window else None,
        }


class InProcessClient:
    """Same contract as ChatClient.complete(body), served by the in-process engine.

    continue_prompts (rollouts): a request that continues an earlier answer of this process is
    sent as that answer's own token ids plus the template's continuation, so vLLM's prefix cache
    serves the earlier prompt and answer (forge/engine/continuation.py)."""

    def __init__(
        self,
        engine: VllmInProcess,
        tokenizer: Tokenizer,
        template_kwargs: dict[str, Any] | None,
        continue_prompts: bool = False,
    ) -> None:
        self.engine = engine
        self.tok = tokenizer
        self.template_kwargs = template_kwargs or {}
        self.continuations = Continuations(self._render, tokenizer.encode) if continue_prompts else None
        m = engine.model
        self.load = EngineLoad((m.max_num_seqs or DEFAULT_VLLM_MAX_NUM_SEQS) * max(1, m.dp))
        self.priority_scheduling = priority_scheduling(m)

    def _render(self, messages: list[dict[str, Any]]) -> str:
        return self.tok.render(messages, **self.template_kwargs)

    async def __aenter__(self) -> InProcessClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def sampling_params(self, body: dict[str, Any]) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = dict(self.engine.defaults)
        params.update({k: body[k] for k in SAMPLING_KEYS if k in body})
        params["max_tokens"] = body["max_tokens"]
        if "structured_outputs" in body:  # generation.json_schema: guided decoding in-process
            from vllm.sampling_params import StructuredOutputsParams

            params["structured_outputs"] = StructuredOutputsParams(**body["structured_outputs"])
        return SamplingParams(**params, output_kind=RequestOutputKind.FINAL_ONLY)

    async def complete(self, body: dict[str, Any], key: str | None = None, priority: int = 0) -> Completion:
        """priority: vLLM's (lower first), sent only when the engine schedules by priority
        (model.engine_args.scheduling_policy=priority; vLLM refuses it otherwise)."""
        await self.engine.wait_ready()
        messages = body["messages"]
        t0 = time.perf_counter()
        if self.continuations is not None:
            ids, text = self.continuations.prompt_ids(messages)
        else:
            ids, text = self.tok.encode(self._render(messages)), ""
        self.load.prompt_s += time.perf_counter() - t0
        try:
            params = self.sampling_params(body)
        except (ValueError, TypeError) as exc:
            raise RequestRejected(400, str(exc)) from exc
        final = None
        self.load.change(+1)
        try:
            extra = {"priority": priority} if self.priority_scheduling and priority else {}
            async for out in self.engine.llm.generate({"prompt_token_ids": ids}, params, uuid.uuid4().hex, **extra):
                final = out
        except ValueError as exc:  # e.g. prompt longer than max_model_len
            raise RequestRejected(400, str(exc)) from exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            cause = exc.__cause__ or exc.__context__  # AsyncLLM wraps the real error, with no message
            if isinstance(cause, (ValueError, TypeError)):  # this request's parameters: the row's fault
                raise RequestRejected(400, f"{cause.__class__.__name__}: {cause}") from exc
            why = f"{exc.__class__.__name__}: {exc}" + (f" ({cause.__class__.__name__}: {cause})" if cause else "")
            raise EngineError(f"vLLM engine failed: {why}") from exc
        finally:
            self.load.change(-1)
        choice = final.outputs[0]
        stop = choice.stop_reason  # None: EOS or length; int: a stop token id; str: a stop string
        if self.continuations is not None and not isinstance(stop, str):
            t0 = time.perf_counter()
            stopped_on_token = choice.finish_reason == "stop"
            self.continuations.remember(messages, text, ids, choice.text, list(choice.token_ids), stopped_on_token)
            self.load.prompt_s += time.perf_counter() - t0
        return Completion(
            text=choice.text,
            reasoning=None,
            finish_reason=choice.finish_reason or "unknown",
            prompt_tokens=len(final.prompt_token_ids or ids),
            completion_tokens=len(choice.token_ids),
            cached_tokens=int(getattr(final, "num_cached_tokens", None) or 0),
        )
