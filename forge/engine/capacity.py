"""How many requests to keep in flight, from what the engine reports.

vLLM preempts (and recomputes) sequences once the KV cache is full: on the kit's workload
max_num_seqs 1024 gave 18,178 output tok/s and 512 gave 26,289. forge therefore keeps at most
as many requests in flight as the KV cache can hold at the expected sequence length.
"""

from __future__ import annotations

import re

DEFAULT_IN_FLIGHT = 64
MAX_AUTO_IN_FLIGHT = 1024
_INFO = re.compile(r"^vllm:cache_config_info\{(?P<labels>[^}]*)\}", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def kv_tokens_from_metrics(text: str) -> int | None:
    """num_gpu_blocks x block_size from vLLM's Prometheus `vllm:cache_config_info` line."""
    match = _INFO.search(text)
    if not match:
        return None
    labels = dict(_LABEL.findall(match.group("labels")))
    try:
        return int(labels["num_gpu_blocks"]) * int(labels["block_size"])
    except (KeyError, ValueError):
        return None


def choose_in_flight(
    configured: int | None, kv_tokens: int | None, expected_len: int, max_num_seqs: int | None
) -> tuple[int, str]:
    """(limit, why). The user's run.max_in_flight wins; else KV capacity / expected length."""
    if configured is not None:
        return configured, "run.max_in_flight"
    if not kv_tokens or expected_len <= 0:
        return DEFAULT_IN_FLIGHT, "default (the engine reports no KV-cache capacity)"
    fit = max(1, kv_tokens // expected_len)
    cap = min(max_num_seqs or MAX_AUTO_IN_FLIGHT, MAX_AUTO_IN_FLIGHT)
    limit = min(fit, cap)
    return limit, (
        f"KV cache {kv_tokens:,} tokens / ~{expected_len:,} tokens per sequence = {fit}"
        + (f", capped at {cap}" if fit > cap else "")
    )
