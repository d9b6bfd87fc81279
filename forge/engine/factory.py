"""The Engine object for model.engine: its own module, since it names every kind (the server
process, the in-process vLLM, an endpoint) and none of them may import another's module back."""

from __future__ import annotations

from pathlib import Path

from forge.engine.config import EngineKind, ModelConfig
from forge.engine.server import Endpoint, Engine, LocalServer


def open_engine(model: ModelConfig, model_path: str, log_path: Path, seed: int | None = None) -> Engine:
    """The Engine for model.engine (not started yet)."""
    if model.engine == EngineKind.endpoint:
        return Endpoint(model)
    if model.engine == EngineKind.openai_batch:
        from forge.engine.batch import BatchEndpoint

        return BatchEndpoint(model)
    if model.engine == EngineKind.anthropic_batch:
        from forge.engine.anthropic_batch import AnthropicBatchEndpoint

        return AnthropicBatchEndpoint(model)
    if model.engine == EngineKind.vllm_async:
        from forge.engine.inprocess import VllmInProcess  # imports vllm: only when asked for

        return VllmInProcess(model, model_path, seed)
    return LocalServer(model, model_path, log_path, seed)
