"""The generate stage's cross-field checks (its registry `validate` hook): sampling parameters
against the model, the judge model's share of the GPUs, and the rollout function."""

from __future__ import annotations

from typing import Any

from forge.engine.config import EngineKind
from forge.schema import ConfigError
from forge.stages.generate.rollout.config import CHAT_FN


def _positive(key: str, value: float | None) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{key}: must be > 0 (got {value})")


def validate_generate(cfg: Any) -> None:
    """ConfigError naming the key, for generation.*, judge_model's GPU share and rollout.*."""
    m, g = cfg.model, cfg.generation
    _positive("generation.max_tokens", g.max_tokens)
    _positive("generation.rollouts", g.rollouts)
    if g.temperature is not None and g.temperature < 0:
        raise ConfigError(f"generation.temperature: must be >= 0 (got {g.temperature})")
    if g.top_p is not None and not 0 < g.top_p <= 1:
        raise ConfigError(f"generation.top_p: must be in (0, 1] (got {g.top_p})")
    if m.max_model_len is not None and g.max_tokens >= m.max_model_len:
        raise ConfigError(
            f"generation.max_tokens: {g.max_tokens} leaves no room for a prompt in "
            f"model.max_model_len={m.max_model_len}"
        )
    if cfg.run.plan and cfg.rollout.fn != CHAT_FN:
        raise ConfigError(f"run.plan: estimates one request per row; rollout.fn={cfg.rollout.fn} is not estimated")
    models = [m] + ([cfg.judge_model] if cfg.judge_model is not None else [])
    if g.top_k is not None and any(x.engine == EngineKind.transformers for x in models):
        raise ConfigError("generation.top_k: the transformers CPU engine rejects top_k; leave it null")
    gpu = (EngineKind.vllm, EngineKind.vllm_async, EngineKind.sglang)
    j = cfg.judge_model
    if j is not None and m.engine in gpu and j.engine in gpu:
        shares = (m.gpu_memory_utilization, j.gpu_memory_utilization)
        if None in shares or sum(shares) > 0.95:
            raise ConfigError(
                "judge_model.gpu_memory_utilization: the model and judge_model engines share the task's GPUs; set "
                "model.gpu_memory_utilization and judge_model.gpu_memory_utilization so they sum to 0.95 or less "
                f"(now {shares[0]} and {shares[1]})"
            )
    if g.json_retries < 0:
        raise ConfigError(f"generation.json_retries: must be >= 0 (got {g.json_retries})")
    from forge.stages.generate.rollout.checks import validate_rollout  # imports the user's module: only when validating

    validate_rollout(cfg)
