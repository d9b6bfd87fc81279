"""The engines that score: per-token log-probabilities of a token sequence, or one embedding per
text. On CPU, transformers (the tiny model in tests); on GPU, vLLM's AsyncLLM in this process:
prompt log-probabilities of one forward pass with no generation, or a pooling model. AsyncLLM
(not the offline LLM class) because it runs `model.dp` data-parallel engines in one process and
lets forge hand over batch k+1 while batch k is still on the GPU.

Both backends answer `submit_logprobs(seqs)` / `submit_embed(texts)` with a Future, so the stage
prepares the next batch while the engine works.

Memory: prompt log-probabilities are not part of vLLM's KV-cache sizing (each scheduled token
needs a vocabulary-wide float32 row: 8,192 tokens x 151,936 ids = 5 GB), so forge sets the
engine's max_num_batched_tokens to `score.batch_tokens`: no engine step computes more rows than
that. On CPU, rows sorted by length go in groups of at most that many tokens, padding included.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from forge.config import ForgeConfig
from forge.engine.config import EngineKind
from forge.schema import ConfigError

log = logging.getLogger("forge.stages.score")


def _groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices in groups whose (longest x count) stays within budget, shortest rows first."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and lengths[i] * (len(current) + 1) > budget:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def _done(value: Any) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


def pooling_mode(model_path: str) -> str:
    """How a sentence-transformers checkpoint pools (1_Pooling/config.json): mean | cls | last.
    Without one, last: vLLM's default for a decoder turned into an embedding model."""
    path = Path(model_path) / "1_Pooling" / "config.json"
    if path.exists():
        conf = json.loads(path.read_text())
        for key, mode in (("pooling_mode_lasttoken", "last"), ("pooling_mode_cls_token", "cls")):
            if conf.get(key):
                return mode
        if conf.get("pooling_mode_mean_tokens"):
            return "mean"
    return "last"


LOGPROB_BYTES = 12  # per (token, vocabulary id): bf16 logits, float32 log-softmax, its rank mask


def logprob_headroom(model_path: str, batch_tokens: int, kw: dict[str, Any]) -> float:
    """The gpu_memory_utilization that leaves room for one engine step's prompt log-probabilities
    (at most batch_tokens rows x vocabulary x 12 bytes, outside vLLM's KV sizing)."""
    from transformers import AutoConfig
    from vllm.platforms import current_platform

    conf = AutoConfig.from_pretrained(model_path, trust_remote_code=bool(kw.get("trust_remote_code")))
    vocab = getattr(conf, "vocab_size", None) or conf.get_text_config().vocab_size
    total = current_platform.get_device_total_memory(0)
    need = batch_tokens * vocab * LOGPROB_BYTES
    asked = float(kw.get("gpu_memory_utilization", 0.9))
    util = asked - need / total
    if util < 0.1 or util < asked / 3:
        raise ConfigError(
            f"score.batch_tokens={batch_tokens}: one step's prompt log-probabilities take {need / 2**30:.1f} GiB "
            f"({batch_tokens} tokens x {vocab} ids x {LOGPROB_BYTES} B) of the GPU's {total / 2**30:.0f} GiB; "
            "lower score.batch_tokens"
        )
    log.info(
        "score: gpu_memory_utilization %.3f -> %.3f: %.1f GiB left for prompt log-probabilities "
        "(score.batch_tokens=%d x %d ids x %d B, outside vLLM's KV sizing)",
        asked, util, need / 2**30, batch_tokens, vocab, LOGPROB_BYTES,
    )  # fmt: skip
    return round(util, 4)


class TransformersScorer:
    """NLL or embeddings with transformers on CPU (float32), synchronously."""

    def __init__(self, model_path: str, kind: str, batch_tokens: int) -> None:
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.kind = kind
        self.batch_tokens = batch_tokens
        config = AutoConfig.from_pretrained(model_path)
        self.context = getattr(config, "max_position_embeddings", None)
        cls = AutoModelForCausalLM if kind == "nll" else AutoModel
        self.model = cls.from_pretrained(model_path, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path) if kind == "embed" else None
        self.pooling = pooling_mode(model_path)

    def count(self, texts: list[str]) -> list[int]:
        return [len(x) for x in self.tokenizer(texts)["input_ids"]]

    def _padded(self, seqs: list[np.ndarray], group: list[int]) -> tuple[Any, Any]:
        torch = self.torch
        longest = max(len(seqs[i]) for i in group)
        ids = torch.zeros((len(group), longest), dtype=torch.long)
        attn = torch.zeros((len(group), longest), dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, : len(seqs[i])] = torch.from_numpy(seqs[i].astype(np.int64))
            attn[row, : len(seqs[i])] = 1
        return ids, attn

    def token_logprobs(self, seqs: list[np.ndarray]) -> list[np.ndarray]:
        """log p(s[t] | s[:t]) for t = 1..len(s)-1, per sequence (float64)."""
        torch = self.torch
        out: list[np.ndarray] = [np.empty(0)] * len(seqs)
        for group in _groups([len(s) for s in seqs], self.batch_tokens):
            ids, attn = self._padded(seqs, group)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=attn).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            for row, i in enumerate(group):
                out[i] = logp[row, : len(seqs[i]) - 1].double().numpy()
        return out

    def embed(self, texts: list[str]) -> list[np.ndarray]:
        """The checkpoint's pooling (pooling_mode) of the last hidden states, L2-normalized."""
        torch = self.torch
        seqs = [np.asarray(x) for x in self.tokenizer(texts)["input_ids"]]
        out: list[np.ndarray] = [np.empty(0)] * len(seqs)
        for group in _groups([len(s) for s in seqs], self.batch_tokens):
            ids, attn = self._padded(seqs, group)
            with torch.inference_mode():
                hidden = self.model(input_ids=ids, attention_mask=attn).last_hidden_state.float()
                if self.pooling == "mean":
                    pooled = (hidden * attn[..., None]).sum(1) / attn.sum(1, keepdim=True)
                elif self.pooling == "cls":
                    pooled = hidden[:, 0]
                else:  # last token of each row (rows are right-padded)
                    pooled = hidden[torch.arange(len(group)), attn.sum(1) - 1]
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            for row, i in enumerate(group):
                out[i] = pooled[row].numpy().astype(np.float32)
        return out

    def wait_ready(self) -> None:
        pass

    def submit_logprobs(self, seqs: list[np.ndarray]) -> Future:
        return _done(self.token_logprobs(seqs))

    def submit_embed(self, texts: list[str]) -> Future:
        return _done(self.embed(texts))

    def close(self) -> None:
        pass


def engine_failed(exc: Exception) -> Exception:
    """One line for the run's error: the engine's own words, with the cause AsyncLLM hides."""
    from forge.engine.server import EngineError

    cause = exc.__cause__ or exc.__context__
    why = f"{exc.__class__.__name__}: {exc}" + (f" ({cause.__class__.__name__}: {cause})" if cause else "")
    return EngineError(f"vLLM engine failed while scoring: {why}")


class VllmScorer:
    """NLL from vLLM's prompt log-probabilities (one forward pass per row, no generation), or
    embeddings from a vLLM pooling model: AsyncLLM on an event loop of its own thread, so calls
    from the stage return at once with a Future."""

    def __init__(self, cfg: ForgeConfig, model_path: str, kind: str, batch_tokens: int) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ConfigError("model.engine=vllm: vllm is not installed (pip install 'forge[vllm]')") from None
        from forge.engine.inprocess import engine_kwargs

        kw = engine_kwargs(cfg.model, model_path, cfg.generation.seed)
        kw["max_num_batched_tokens"] = cfg.model.max_num_batched_tokens or batch_tokens
        kw.setdefault("enable_prefix_caching", False)  # each row is scored once: nothing to reuse
        if kind == "embed":
            kw["runner"] = "pooling"
        else:
            kw["gpu_memory_utilization"] = logprob_headroom(model_path, kw["max_num_batched_tokens"], kw)
        self.kind = kind
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="forge-score-engine", daemon=True)
        self.thread.start()
        self.llm: Any = None
        self.context: int | None = None
        # the engine starts on its own thread: the stage tokenizes the first batch meanwhile
        self.starting = asyncio.run_coroutine_threadsafe(self._start(kw), self.loop)

    def wait_ready(self) -> None:
        if self.llm is None:
            self.llm = self.starting.result()
            # a request's prompt plus the one token vLLM generates must fit max_model_len
            self.context = self.llm.vllm_config.model_config.max_model_len - 1

    async def _start(self, kw: dict[str, Any]) -> Any:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from forge.engine.server import EngineError

        try:
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))
        except Exception as exc:  # vLLM raises many types on bad config / OOM
            raise EngineError(f"vLLM failed to start: {exc.__class__.__name__}: {exc}") from exc

    async def _logprobs(self, seqs: list[np.ndarray]) -> list[np.ndarray]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=1,
            prompt_logprobs=0,  # the prompt token's own log-probability, no top-k
            temperature=0.0,
            detokenize=False,
            flat_logprobs=True,  # a few flat lists per row, not a dict per token
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

        async def one(seq: np.ndarray) -> np.ndarray:
            ids = seq.astype(np.int64).tolist()
            final = None
            try:
                async for out in self.llm.generate({"prompt_token_ids": ids}, params, uuid.uuid4().hex):
                    final = out
            except Exception as exc:  # AsyncLLM wraps the real error (the engine died, ...)
                raise engine_failed(exc) from exc
            flat = final.prompt_logprobs
            if flat.token_ids != ids[1:]:  # one entry per position: the prompt's own token
                raise RuntimeError(f"vLLM prompt log-probabilities do not follow the prompt ({len(flat)} positions)")
            return np.asarray(flat.logprobs, dtype=np.float64)

        return list(await asyncio.gather(*(one(s) for s in seqs)))

    async def _embed(self, texts: list[str]) -> list[np.ndarray]:
        from vllm import PoolingParams

        params = PoolingParams(task="embed")

        async def one(text: str) -> np.ndarray:
            final = None
            try:
                async for out in self.llm.encode(text, params, uuid.uuid4().hex):
                    final = out
            except Exception as exc:
                raise engine_failed(exc) from exc
            return np.asarray(final.outputs.data.float().cpu().numpy(), dtype=np.float32)

        return list(await asyncio.gather(*(one(t) for t in texts)))

    def submit_logprobs(self, seqs: list[np.ndarray]) -> Future:
        return asyncio.run_coroutine_threadsafe(self._logprobs(seqs), self.loop)

    def submit_embed(self, texts: list[str]) -> Future:
        return asyncio.run_coroutine_threadsafe(self._embed(texts), self.loop)

    def token_logprobs(self, seqs: list[np.ndarray]) -> list[np.ndarray]:
        self.wait_ready()
        return self.submit_logprobs(seqs).result()

    def embed(self, texts: list[str]) -> list[np.ndarray]:
        self.wait_ready()
        return self.submit_embed(texts).result()

    def count(self, texts: list[str]) -> list[int]:
        tok = self.llm.get_tokenizer()
        return [len(tok.encode(t)) for t in texts]

    def close(self) -> None:
        try:
            llm = self.llm or self.starting.result()
        except Exception:  # the start failed: already reported
            llm = None
        if llm is not None:
            try:
                llm.shutdown()
            except Exception as exc:  # a dead engine: nothing left to stop
                log.warning("vLLM shutdown: %s", exc)
        self.llm = None
        self.loop.call_soon_threadsafe(self.loop.stop)


def check_engine(engine: EngineKind) -> None:
    if engine not in (EngineKind.transformers, EngineKind.vllm, EngineKind.vllm_async):
        raise ConfigError(
            f"model.engine={engine.value}: pipeline=score runs the model in this process; use model.engine=vllm "
            "(GPU) or transformers (CPU)"
        )


def make_scorer(cfg: ForgeConfig, model_path: str) -> Any:
    check_engine(cfg.model.engine)
    if cfg.model.engine == EngineKind.transformers:
        return TransformersScorer(model_path, cfg.score.kind, cfg.score.batch_tokens)
    return VllmScorer(cfg, model_path, cfg.score.kind, cfg.score.batch_tokens)
