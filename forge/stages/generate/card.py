"""The dataset card: <run dir>/README.md with the Hub's YAML header, written when a run finishes
(at the end of a local run, by the finalize job on Slurm). Everything in it is read back from the
run dir (config.yaml, forge_run.json, stats.json, the shards), so a resumed run never counts twice
and the card can be rebuilt at any time. Secrets are masked like everywhere else."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from forge.io.secrets import redact_text
from forge.run.card_parts import (
    SAMPLE_CHARS,
    _size_category,
    front_matter,
    lineage_lines,
    reproduce_command,
    unfinished_lines,
)
from forge.run.output import shard_files

SAMPLE_ROWS = 3


def _samples(out_dir: Path) -> list[dict[str, Any]]:
    files = shard_files(out_dir / "data")
    if not files:
        return []
    table = pq.read_table(files[0]).slice(0, SAMPLE_ROWS)
    out = []
    for row in table.to_pylist():
        messages = row.get("messages") or []
        prompt = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "") if messages else ""
        if "text" in row:
            completion = row["text"] or ""
        else:  # a rollout's own columns
            skip = {"id", "rollout", "output_index", "messages", "metadata", "model", "revision", "engine"}
            completion = json.dumps({k: v for k, v in row.items() if k not in skip}, default=str, ensure_ascii=False)
        out.append(
            {
                "id": row["id"],
                "prompt": _clip(prompt or ""),
                "completion": _clip(completion),
                "finish_reason": row.get("finish_reason"),
            }
        )
    return out


def rollout_rows(cfg: dict[str, Any]) -> list[str]:
    """What each sample ran, when it is not one plain request: the rollout and its knobs, the judge."""
    r = cfg.get("rollout") or {}
    if not r or (r.get("fn", "").endswith("library:chat") and not (cfg.get("generation") or {}).get("json_schema")):
        return []
    from forge.stages.generate.rollout.checks import load_ref

    try:  # a ready rollout says which knobs it reads
        knobs = getattr(load_ref("rollout.fn", r["fn"]), "uses", ())
    except Exception:  # noqa: BLE001 (a user's module that no longer imports: no knobs shown)
        knobs = ()
    shown = ", ".join(f"{k}={r[k]}" for k in knobs if k in r)
    rows = [f"| rollout | `{r['fn']}`{f' ({shown})' if shown else ''}; its prompts and options: config.yaml |"]
    judge = cfg.get("judge_model")
    if judge:
        rows.append(f"| judge model | `{judge['name_or_path']}` on `{judge['engine']}` |")
    return rows


def _v(value: Any) -> str:
    """A config value in the card: `value`, or "default" where it was left unset."""
    return "default" if value is None else f"`{value}`"


def _clip(text: str) -> str:
    text = redact_text(text)
    return text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + " …"


def _rate(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.2f}%" if whole else "n/a"


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def gpu_hours(stats: dict[str, Any]) -> float:
    """GPU time held by every session: start-up + generation, times its GPUs."""
    total = 0.0
    for s in stats.get("sessions", []):
        held = (s.get("engine_startup_s") or 0.0) + (s.get("generation_s") or 0.0)
        total += held * (s.get("gpus") or 0) / 3600.0
    return total


def measured_sessions(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task, its last session that generated something (a resume with nothing left sends no
    request and measures nothing)."""
    by_task: dict[Any, dict[str, Any]] = {}
    for s in stats.get("sessions", []):
        if s.get("output_tokens_per_s"):
            by_task[s.get("task")] = s
    return list(by_task.values())


def progress_section(progress: dict[str, Any], width: int = 30) -> list[str]:
    """A text bar, done/total, speed and ETA: the card on the Hub while the run goes on."""
    done, total = progress.get("done", 0), progress.get("total", 0)
    frac = done / total if total else 0.0
    filled = int(round(frac * width))
    eta = progress.get("eta_s")
    eta_text = "?" if eta is None else f"{int(eta) // 3600}:{int(eta) // 60 % 60:02d}:{int(eta) % 60:02d}"
    return [
        "## Progress",
        "",
        f"`[{'#' * filled}{'-' * (width - filled)}]` **{100 * frac:.1f}%**: {_num(done)} / {_num(total)} documents, "
        f"{_num(progress.get('output_tokens_per_s'))} output tok/s, ETA {eta_text} "
        f"(updated {progress.get('updated_at', '?')}; refreshed while the run goes on)",
        "",
    ]


def render_generation_card(out_dir: Path, hub_repo: str | None = None, progress: dict[str, Any] | None = None) -> str:
    """The generate stage's card; with `progress`, a progress section first (for a run still going
    on, whose stats.json may not exist yet: its statistics then come from the shards written so far)."""
    cfg = yaml.safe_load((out_dir / "config.yaml").read_text())
    stats_path = out_dir / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else _partial_stats(out_dir)
    if not stats_path.exists() and progress:
        stats["documents_in"] = progress.get("total", 0)
    config_hash = hashlib.sha256((out_dir / "config.yaml").read_bytes()).hexdigest()[:12]
    ds, model, gen, prompt = cfg["dataset"], cfg["model"], cfg["generation"], cfg["prompt"]
    last = stats.get("last_sessions") or [{}]
    engine_version = next((s.get("engine_version") for s in last if s.get("engine_version")), None)
    rows, docs_in = stats["rows_written"], stats["documents_in"]
    name = str(ds["name"])  # a Hub id is `name` or `org/name`; anything else is a local path
    hub_source = not Path(name).expanduser().exists() and "://" not in name
    hub_source = hub_source and not name.startswith(("/", ".", "~")) and name.count("/") <= 1
    header = {
        "pretty_name": f"{Path(out_dir).name} (forge)",
        "tags": ["synthetic", "forge"],
        "task_categories": ["text-generation"],
        "size_categories": [_size_category(rows)],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
    }
    if hub_source:
        header["source_datasets"] = [ds["name"]]
    measured = measured_sessions(stats)
    per_gpu = [s["output_tokens_per_s"] / s["gpus"] for s in measured if s.get("gpus")]
    per_gpu = [sum(per_gpu) / len(per_gpu)] if per_gpu else []
    finish = stats.get("finish_reasons", {})
    failed = stats.get("rejected_by_stage", {}).get("request", 0)
    lines = [
        *front_matter(header),
        f"Synthetic data generated by forge from `{ds['name']}` with `{model['name_or_path']}`.",
        "",
        *unfinished_lines(stats),
        *(progress_section(progress) if progress is not None else []),
        "## How it was made",
        "",
        "| | |",
        "|---|---|",
        f"| source dataset | `{ds['name']}` (config {_v(ds.get('config'))}, split {_v(ds.get('split'))}, "
        f"revision {_v(ds.get('revision'))}), prompt column {_v(ds.get('prompt_column'))} |",
        f"| model | `{model['name_or_path']}` (revision {_v(model.get('revision'))}) |",
        f"| engine | `{model['engine']}` ({engine_version or 'version not reported'}) |",
        f"| parallelism | tp {model['tp']}, pp {model['pp']}, dp {model['dp']}; "
        f"{cfg['cluster'].get('tasks', 1)} task(s) on `{cfg['cluster'].get('name')}` |",
        f"| speculative decoding | {json.dumps(model.get('speculative')) if model.get('speculative') else 'none'} |",
        f"| engine settings | max_model_len {_v(model.get('max_model_len'))}, "
        f"max_num_seqs {_v(model.get('max_num_seqs'))}, kv_cache_dtype {_v(model.get('kv_cache_dtype'))}, "
        f"quantization {_v(model.get('quantization'))} |",
        f"| sampling | {', '.join(f'{k}={json.dumps(v)}' for k, v in gen.items())} |",
        *rollout_rows(cfg),
        f"| config hash | `{config_hash}` (sha256 of config.yaml) |",
        "",
        "Prompt template:" if prompt.get("template") else "Prompt: the prompt column is the user message as is.",
    ]
    if prompt.get("template"):
        lines += ["", "```", prompt["template"], "```"]
    lines += ["", f"System prompt: {('`' + prompt['system'] + '`') if prompt.get('system') else 'none'}", ""]
    lines += ["Reproduce:", "", "```bash", reproduce_command(out_dir), "```", ""]
    lines += [
        "## Statistics",
        "",
        "| | |",
        "|---|---|",
        f"| documents in | {_num(docs_in)} |",
        f"| documents written | {_num(stats['documents_written'])} ({_num(rows)} rows) |",
        f"| documents rejected | {_num(stats['documents_rejected'])} ({_rate(stats['documents_rejected'], docs_in)}) |",
        f"| tokens in / out | {_num(stats['tokens_in'])} / {_num(stats['tokens_out'])} |",
        f"| mean tokens in / out per row | {_num(stats['mean_tokens_in'])} / {_num(stats['mean_tokens_out'])} |",
        f"| output tok/s | {_num(sum(s['output_tokens_per_s'] for s in measured))} in all, "
        f"{_num(per_gpu[0] if per_gpu else None)} per GPU (from engine-ready; each task's last measured session) |",
        f"| GPU-hours | {gpu_hours(stats):.3f} |",
        *(
            [
                f"| cost (US$) | {stats['spent_usd']:,.4f} spent over all sessions; the rows kept cost "
                f"{stats.get('rows_cost_usd', 0.0):,.4f} |"
            ]  # fmt: skip
            if stats.get("spent_usd")
            else []
        ),
        f"| truncated prompts | {_rate(stats.get('truncated_rows', 0), rows)} |",
        f"| stopped at max_tokens | {_rate(finish.get('length', 0), rows)} |",
        f"| failed requests (quarantined) | {_rate(failed, docs_in)} |",
        f"| rejection by stage | {json.dumps(stats.get('rejected_by_stage', {}))} |",
        "",
    ]
    samples = _samples(out_dir)
    if samples:
        lines += ["## Sample rows", ""]
        for s in samples:
            lines += [f"**{s['id']}** ({s['finish_reason']})", "", "> " + s["prompt"].replace("\n", "\n> "), ""]
            lines += ["```text", s["completion"], "```", ""]
    lines += lineage_lines(out_dir)
    lines += ["## Loading", "", "```python", "from datasets import load_dataset", ""]
    if hub_repo:
        lines += [f'ds = load_dataset("{hub_repo}", split="train")']
    lines += [f'ds = load_dataset("parquet", data_files="{out_dir}/data/*.parquet", split="train")', "```", ""]
    return redact_text("\n".join(lines))


def _partial_stats(out_dir: Path) -> dict[str, Any]:
    """What the shards on disk hold, for a card rendered before the run's stats.json exists."""
    from forge.stages.generate.stats import shard_totals

    return {"documents_in": 0, **shard_totals(out_dir, None), "last_sessions": [], "sessions": []}
