"""stats.json: totals read back from the shards (so resumed runs never double-count) plus a
record per session of what that invocation did: requests, retries, start-up and throughput
measured from engine-ready to the last answer (start-up excluded, reported on its own)."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from forge.run.output import ROW_COUNTS, read_columns, shard_files, unfinished_inputs, write_json_atomic
from forge.stages.generate.generator import SessionStats

log = logging.getLogger("forge.stages.generate.stats")


def shard_totals(out_dir: Path, task: int | None) -> dict[str, Any]:
    """Documents, rows, tokens and finish reasons of what is on disk."""
    data = read_columns(
        shard_files(out_dir / "data", task),
        ["id", *ROW_COUNTS],
    )
    rej = read_columns(shard_files(out_dir / "rejected", task), ["id", "rollout", "stage", "retryable"])
    out: dict[str, Any] = {"rows_written": 0, "documents_written": 0, "tokens_in": 0, "tokens_out": 0}
    if data is not None:
        out["rows_written"] = data.num_rows
        out["documents_written"] = len(pc.unique(data.column("id")))
        out["tokens_in"] = int(pc.sum(data.column("prompt_tokens")).as_py() or 0)
        out["tokens_out"] = int(pc.sum(data.column("completion_tokens")).as_py() or 0)
        # a rollout row with no engine answer (its function returned without one) has none
        out["finish_reasons"] = dict(Counter(r or "none" for r in data.column("finish_reason").to_pylist()))
        out["length_stopped"] = int(pc.sum(data.column("length_stopped")).as_py() or 0)
        out["truncated_rows"] = int(pc.sum(data.column("truncated")).as_py() or 0)
        out["content_null_rows"] = int(pc.sum(data.column("content_null")).as_py() or 0)
        costs = data.column("cost_usd")
        if costs.null_count < len(costs):  # the rows kept, at the prices of the sessions that made them
            out["rows_cost_usd"] = round(pc.sum(costs).as_py() or 0.0, 6)
        written_ids = set(data.column("id").to_pylist())
    else:
        out.update(finish_reasons={}, length_stopped=0, truncated_rows=0, content_null_rows=0)
        written_ids = set()
    rejected: dict[tuple[str, int], tuple[str, bool]] = {}
    if rej is not None:
        cols = [rej.column(c).to_pylist() for c in ("id", "rollout", "stage", "retryable")]
        for key, rollout, stage, retryable in zip(*cols, strict=True):
            rejected[(key, rollout)] = (stage, retryable)
    by_stage: Counter = Counter()
    rejected_docs: set[str] = set()
    for (key, rollout), (stage, retryable) in rejected.items():
        if retryable and key in written_ids:
            continue  # a later session answered it
        by_stage[stage] += 1
        if rollout < 0 or key not in written_ids:
            rejected_docs.add(key)
    out["rejected_rows"] = sum(by_stage.values())
    out["rejected_by_stage"] = dict(by_stage)
    out["documents_rejected"] = len(rejected_docs)
    out["mean_tokens_in"] = out["tokens_in"] / out["rows_written"] if out["rows_written"] else 0.0
    out["mean_tokens_out"] = out["tokens_out"] / out["rows_written"] if out["rows_written"] else 0.0
    return out


def session_record(
    s: SessionStats, startup_s: float | None, ready_at: float | None, restarts: int, gpus: int, status: str
) -> dict[str, Any]:
    """This invocation's numbers. Throughput counts from the first request sent to the last
    answer: engine start-up and tokenizer loading are not generation (start-up has its own field)."""
    window = None
    start = s.first_send if s.first_send is not None else ready_at
    if start is not None and s.last_answer is not None:
        window = max(s.last_answer - start, 1e-9)
    tps_out = s.completion_tokens / window if window else None
    return {
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": status,
        "requests_sent": s.requests_sent,
        "answers": s.answers,
        "cache_hits": s.cache_hits,
        "retries": s.retries,
        "retry_reasons": dict(s.retry_reasons),
        "rejected": dict(s.rejected),
        "tokens_in": s.prompt_tokens,
        "tokens_in_prefix_cached": s.prompt_tokens_cached,
        "cost_usd": round(s.cost_usd, 6),
        "prefix_cache_hit_rate": s.prompt_tokens_cached / s.prompt_tokens if s.prompt_tokens else None,
        "tokens_out": s.completion_tokens,
        "finish_reasons": dict(s.finish_reasons),
        "content_null": s.content_null,
        "engine_startup_s": startup_s,
        "engine_restarts": restarts,
        "generation_s": window,
        "first_request_after_ready_s": (
            s.first_send - ready_at if s.first_send is not None and ready_at is not None else None
        ),
        "output_tokens_per_s": tps_out,
        "input_tokens_per_s": s.prompt_tokens / window if window else None,
        "gpus": gpus,
        "output_tokens_per_s_per_gpu": tps_out / gpus if tps_out is not None and gpus else None,
    }


def _read_json(path: Path) -> dict[str, Any]:
    """A per-task stats file; a damaged one (a disk that filled, a hand edit) loses only its session
    history: the totals are always recounted from the shards."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError) as exc:
        log.warning("%s is damaged (%s); its session history starts again (totals come from the shards)", path, exc)
        return {}


def spent_usd(out_dir: Path, task: int) -> float:
    """What the task's earlier sessions spent (their cost_usd), for run.budget_usd."""
    sessions = _read_json(out_dir / "stats" / f"task_{task:05d}.json").get("sessions", [])
    return sum(s.get("cost_usd") or 0.0 for s in sessions)


def write_task_stats(out_dir: Path, task: int, documents_in: int, session: dict[str, Any]) -> dict[str, Any]:
    path = out_dir / "stats" / f"task_{task:05d}.json"
    sessions = _read_json(path).get("sessions", [])
    sessions.append(session)
    stats = {"task": task, "documents_in": documents_in, **shard_totals(out_dir, task), "sessions": sessions}
    write_json_atomic(path, stats)
    return stats


def merge_stats(out_dir: Path) -> dict[str, Any]:
    """stats.json for the whole run: shard totals over all tasks + per-task session summaries."""
    tasks = [t for p in sorted((out_dir / "stats").glob("task_*.json")) if (t := _read_json(p)).get("task") is not None]
    totals = shard_totals(out_dir, None)
    sessions = [dict(s, task=t["task"]) for t in tasks for s in t.get("sessions", [])]
    last = [t["sessions"][-1] for t in tasks if t.get("sessions")]
    merged = {
        "documents_in": sum(t["documents_in"] for t in tasks),
        **totals,
        "requests_sent": sum(s["requests_sent"] for s in sessions),
        "retries": sum(s["retries"] for s in sessions),
        "cache_hits": sum(s["cache_hits"] for s in sessions),
        "spent_usd": round(sum(s.get("cost_usd") or 0.0 for s in sessions), 6),
        "engine_startup_s": [s["engine_startup_s"] for s in last],
        "tasks": len(tasks),
        "last_sessions": last,
        "sessions": sessions,
    }
    rates = [s["output_tokens_per_s_per_gpu"] for s in last if s.get("output_tokens_per_s_per_gpu")]
    merged["output_tokens_per_s_per_gpu"] = sum(rates) / len(rates) if rates else None
    if unfinished := unfinished_inputs(out_dir):
        merged["unfinished_inputs"] = unfinished
    write_json_atomic(out_dir / "stats.json", merged)
    return merged
