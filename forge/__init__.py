"""forge: a declarative, Hydra-configured runner for LLM data pipelines."""

__version__ = "0.1.0"
