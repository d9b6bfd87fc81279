"""How many requests to keep in flight, from what the engine reports.

vLLM preempts (and recomputes) sequences once the KV cache is full: on the kit's workload
max_num_seqs 1024 gave 18,178 output tok/s and 512 gave 26,289. forge therefore keeps at most
as many requests in flight as the KV cache can hold at the expected sequence length, and no more
than the largest batch vLLM captured a CUDA graph for (512 by default): on the H100, 532 in
flight ran at 17,354 tok/s against 24,070 for offline at 512, the batches past 512 running eager.
"""

from __future__ import annotations

import re

DEFAULT_IN_FLIGHT = 64
MAX_AUTO_IN_FLIGHT = 1024
VLLM_GRAPH_CAP = 512  # vLLM's default max_cudagraph_capture_size
# forge's max_num_seqs when model.max_num_seqs is unset: vLLM's own default is 1024 for its
# server on an H100 (KV thrash: 18,178 tok/s) and 256 for an in-process engine (half-empty
# batches: 18,283 tok/s); 512 gave 26,289 tok/s on the kit's workload.
DEFAULT_VLLM_MAX_NUM_SEQS = 512
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
    configured: int | None,
    kv_tokens: int | None,
    expected_len: int,
    max_num_seqs: int | None,
    graph_cap: int | None = None,
    engines: int = 1,
    queue_share: float = 0.5,
) -> tuple[int, str]:
    """(limit, why). The user's run.max_in_flight wins; else KV capacity / expected length,
    capped by max_num_seqs and by the largest CUDA-graph batch. Each of these is per engine, so
    with data parallelism (`engines` = model.dp) the limit is that many times larger: on 2 H200s,
    dp=2 with one engine's worth in flight ran at 1.81x tp=1, with two engines' worth at 2.00x.
    queue_share: requests queued in the engine per running one (a multi-step rollout queues
    more: its next requests exist only once a burst of answers has been processed)."""
    if configured is not None:
        return configured, "run.max_in_flight"
    if not kv_tokens or expected_len <= 0:
        return DEFAULT_IN_FLIGHT, "default (the engine reports no KV-cache capacity)"
    fit = max(1, kv_tokens // expected_len)
    caps = {"max_num_seqs": max_num_seqs, "CUDA-graph batch limit": graph_cap, "forge's ceiling": MAX_AUTO_IN_FLIGHT}
    name, cap = min(((k, v) for k, v in caps.items() if v), key=lambda kv: kv[1])
    running = min(fit, cap)
    # queued requests wait in the engine's scheduler (no KV held), so a finished batch is
    # refilled at once instead of one round trip per worker
    per_engine = running + max(16, int(running * queue_share)) if graph_cap else running
    running, limit = running * engines, per_engine * engines
    why = f"KV cache {kv_tokens:,} tokens / ~{expected_len:,} tokens per sequence = {fit}"
    why += f", capped by the {name} {cap}" if fit > cap else ""
    why += f", x {engines} data-parallel engines" if engines > 1 else ""
    return limit, why + (f"; {running} running + {limit - running} queued in the engine" if limit > running else "")
