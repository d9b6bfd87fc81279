"""The dataset card of a batch stage's run dir (README.md with the Hub's YAML header): where the
rows came from, the mix's requested vs achieved shares, what each filter removed per source, and
the pools. Everything is read back from the run dir, so the card can be rebuilt at any time."""

from __future__ import annotations

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
from forge.stages.registry import STAGES, hook, spec


def _flat(counts: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in counts.items():
        if isinstance(value, dict):
            out += _flat(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _filter_findings(filters: dict[str, Any]) -> list[str]:
    """What filters counted besides removals: PII finds per type, contaminated rows per benchmark."""
    if not filters:
        return []
    lines = ["## Filter findings", "", "| filter | count of | |", "|---|---|---:|"]
    for name, counts in filters.items():
        for key, value in _flat(counts):
            lines.append(f"| `{name}` | {key} | {value:,} |")
    return [*lines, ""]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _sample(out_dir: Path) -> list[str]:
    files = shard_files(out_dir / "data")
    if not files:
        return []
    table = pq.read_table(files[0]).slice(0, 2)
    if "tokens" in table.column_names:  # token rows: the card's token section says what they hold
        return []
    lines = []
    for row in table.to_pylist():
        if row.get("messages"):
            body = "\n".join(f"{m['role']}: {m['content'] or ''}" for m in row["messages"])
        else:
            body = row.get("text") or ""
        body = body if len(body) <= SAMPLE_CHARS else body[:SAMPLE_CHARS] + " …"
        lines += [
            f"**{row['id']}** (from `{(row.get('source') or {}).get('dataset')}`)",
            "",
            "```text",
            body,
            "```",
            "",
        ]
    return lines


SHORT = " (short of its share: dataset.max_repeat)"


def render_stage_card(out_dir: Path, stats: dict[str, Any], hub_repo: str | None = None) -> str:
    cfg = yaml.safe_load((out_dir / "config.yaml").read_text()) if (out_dir / "config.yaml").exists() else {}
    stage = (cfg.get("pipeline") or {}).get("stage", "curate")
    pools = stats.get("pools") or {}
    configs = [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}]
    configs += [
        {"config_name": f"pool_{p}", "data_files": [{"split": "train", "path": f"pools/{p}/*.parquet"}]} for p in pools
    ]
    header = {
        "pretty_name": f"{out_dir.name} (forge {stage})",
        "tags": ["forge", stage],
        "task_categories": ["text-generation"],
        "size_categories": [_size_category(stats.get("rows_kept", 0))],
        "configs": configs,
    }
    settings = cfg.get(stage) or {}
    verb = spec(stage).verb if stage in STAGES else f"{stage}d"
    lines = [
        *front_matter(header),
        f"Rows {verb} by forge: {stats.get('rows_kept', 0):,} kept of {stats.get('rows_in', 0):,} read; "
        f"{stats.get('rows_removed', 0):,} removed, each in `rejected/` with its filter, reason and value.",
        "",
        *unfinished_lines(stats),
        "Reproduce:",
        "",
        "```bash",
        reproduce_command(out_dir),
        "```",
        "",
    ]
    mix = stats.get("mix") or {}
    by_source = stats.get("by_source") or {}
    if mix:
        lines += [
            "## Sources and mix",
            "",
            "| source | rows read | kept | requested share | sampled share | achieved share (kept) | pilot pass rate |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for label, m in mix.items():
            s = by_source.get(label, {})
            lines.append(
                f"| `{label}` | {s.get('rows_in', 0):,} | {s.get('rows_kept', 0):,} | "
                f"{_pct(m.get('requested_share'))} | {_pct(m.get('sampled_share'))} | "
                f"{_pct(m.get('achieved_share'))}{SHORT if m.get('short_of_share') else ''}"
                f" | {_pct(m.get('pilot_pass_rate'))} |"
            )
        lines.append("")
    removed = stats.get("removed_by_filter") or {}
    if removed:
        lines += ["## Removals", "", "| filter | removed | per source |", "|---|---:|---|"]
        for name, n in sorted(removed.items(), key=lambda kv: -kv[1]):
            per = {
                lbl: s.get("removed", {}).get(name) for lbl, s in by_source.items() if s.get("removed", {}).get(name)
            }
            lines.append(f"| `{name}` | {n:,} | {', '.join(f'{k}: {v:,}' for k, v in per.items())} |")
        lines.append("")
    lines += _filter_findings(stats.get("filters") or {})
    card_lines = hook(stage, "card")
    if card_lines is not None:
        lines += card_lines(stats)
    if settings.get("filters"):
        lines += [
            "Filters, in order:",
            "",
            "```yaml",
            yaml.safe_dump(settings["filters"], sort_keys=False).strip(),
            "```",
            "",
        ]
    if pools:
        exprs = settings.get("pools") or {}
        lines += ["## Pools", "", "| pool | rows | expression | folder |", "|---|---:|---|---|"]
        for name, n in pools.items():
            lines.append(f"| `{name}` | {n:,} | `{exprs.get(name, '')}` | `pools/{name}/` |")
        lines.append("")
    lines += _sample(out_dir)
    lines += lineage_lines(out_dir)
    lines += ["## Loading", "", "```python", "from datasets import load_dataset", ""]
    if hub_repo:
        lines += [f'ds = load_dataset("{hub_repo}", split="train")']
    lines += [f'ds = load_dataset("parquet", data_files="{out_dir}/data/*.parquet", split="train")', "```", ""]
    lines += ["Full statistics: `stats.json`.", ""]
    return redact_text("\n".join(lines))
