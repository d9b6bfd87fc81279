"""The `model:` group's schema (conf/model/*.yaml, also `judge_model:`): the model and the engine
that serves it (forge/engine/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from forge.schema import neutral


class EngineKind(str, Enum):
    vllm = "vllm"  # `vllm serve`, a server process forge owns
    vllm_async = "vllm_async"  # vLLM's AsyncLLM inside the forge process (fastest)
    sglang = "sglang"
    endpoint = "endpoint"
    transformers = "transformers"
    openai_batch = "openai_batch"  # the OpenAI Batch API (files + batches), `vllm run-batch`'s format
    anthropic_batch = "anthropic_batch"  # Anthropic's Message Batches


@dataclass
class ModelConfig:
    """The model and the engine that serves it.

    Attributes:
        name_or_path: Hub id or local dir; `forge://tiny-qwen3` is built locally on first use.
        engine: vllm | vllm_async | sglang | endpoint | transformers (the CPU engine).
        tp, pp, dp: tensor, pipeline and data parallel sizes (GPUs per task = tp * pp * dp).
        max_model_len: context length; null = what the engine or model config reports.
        tokenizer: tokenizer used to measure prompts; null = name_or_path.
        endpoint_url: base URL of an OpenAI-compatible server (engine=endpoint).
        api_key_env: NAME of the environment variable holding the API key (never the key).
        engine_args: extra engine command-line flags, `{flag_name: value}`.
        served_name: model name sent in requests; null = name_or_path.
        speculative: vLLM's speculative config as a mapping (`{method: ngram, num_speculative_tokens: 3,
            prompt_lookup_max: 3}`), or null. Typed Any and checked in validate(): OmegaConf 2.3 cannot
            merge a dict override into a null typed-dict node, so `model.speculative={...}` on the
            command line or in a sweep grid failed to compose.
        startup_timeout_s: how long to wait for the engine to answer /v1/models.
        max_restarts: engine restarts allowed per task after a crash.
        compile_cache_dir: torch.compile / CUDA-graph cache shared by tasks (locked while one
            compiles); null = $FORGE_CACHE/vllm.
        price_in_per_mtok, price_out_per_mtok: US dollars per million prompt / completion
            tokens; with either set, every row gets `cost_usd` and stats, progress and card the
            totals (forge/engine/pricing.py). null: no cost is computed.
        price_cached_in_per_mtok: dollars per million prompt tokens the provider served from its
            prompt cache (usage.prompt_tokens_details.cached_tokens); null = price_in_per_mtok.
        batch_size, batch_poll_s, batch_window: engine=openai_batch (forge/engine/batch.py): requests
            per batch (the provider's limit: 50,000 for OpenAI), the first poll interval (it grows
            1.5x per poll, to 10 minutes), and the batch's completion window.
        batch_discount: the share a batch engine takes off model.price_* (0.5: half price, as
            OpenAI and Anthropic bill batches).
    """

    name_or_path: str = "forge://tiny-qwen3"
    revision: str | None = None
    engine: EngineKind = EngineKind.transformers
    tp: int = 1
    pp: int = 1
    dp: int = neutral(1)
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = neutral(None)
    max_num_seqs: int | None = neutral(None)
    max_num_batched_tokens: int | None = neutral(None)
    speculative: Any = None
    kv_cache_dtype: str | None = None
    quantization: str | None = None
    load_format: str | None = None
    trust_remote_code: bool = False
    tokenizer: str | None = None
    endpoint_url: str | None = None
    api_key_env: str | None = neutral(None)
    served_name: str | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)
    startup_timeout_s: float = neutral(900.0)
    max_restarts: int = neutral(3)
    compile_cache_dir: str | None = neutral(None)
    price_in_per_mtok: float | None = neutral(None)
    price_out_per_mtok: float | None = neutral(None)
    price_cached_in_per_mtok: float | None = neutral(None)
    batch_size: int = neutral(50_000)
    batch_poll_s: float = neutral(30.0)
    batch_window: str = neutral("24h")
    batch_discount: float = neutral(0.5)
