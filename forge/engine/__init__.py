"""Engines: an OpenAI-compatible server that forge starts (vllm, sglang, transformers) or one
that already runs (endpoint), and the pooled HTTP client that talks to it. Config: conf/model."""

from forge.engine.client import ChatClient, RequestFailed, RequestRejected
from forge.engine.factory import open_engine
from forge.engine.server import Engine, EngineError

__all__ = ["ChatClient", "Engine", "EngineError", "RequestFailed", "RequestRejected", "open_engine"]
