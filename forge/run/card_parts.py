"""What every card shares (forge/stages/generate/card.py for generation, forge/run/stage_card.py for batch
stages): the front matter, the reproducing command, the unfinished-inputs lines."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from forge.io.secrets import redact, redact_override
from forge.run.output import write_json_atomic

SAMPLE_CHARS = 400


def record_command(out_dir: Path, overrides: list[str]) -> None:
    """Save the overrides that reproduce this run (shown in the card)."""
    write_json_atomic(out_dir / "command.json", {"overrides": [redact_override(o) for o in overrides]})


def reproduce_command(out_dir: Path) -> str:
    path = out_dir / "command.json"
    overrides = json.loads(path.read_text())["overrides"] if path.exists() else sys.argv[1:]
    return " ".join(["forge", *(shlex.quote(o) for o in overrides)])


def front_matter(header: dict[str, Any]) -> list[str]:
    """The card's Hub YAML header (secrets masked) and its title: the first lines of every card."""
    return ["---", yaml.safe_dump(redact(header), sort_keys=False).strip(), "---", "", f"# {header['pretty_name']}", ""]


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M" if n < 10_000_000 else "n>10M"


def unfinished_lines(stats: dict[str, Any]) -> list[str]:
    """A warning for inputs read while they were unfinished (dataset.allow_unfinished)."""
    found = stats.get("unfinished_inputs") or {}
    if not found:
        return []
    listed = "; ".join(f"`{name}` {why}" for name, why in found.items())
    return [f"**Read from an unfinished input** (`dataset.allow_unfinished=true`): {listed}.", ""]


def lineage_lines(out_dir: Path) -> list[str]:
    """The card's chain of recipe steps (lineage.json, written by forge/recipe/ before the step
    ran): each step's stage, fingerprint, counts, time and the settings the recipe gives it."""
    try:
        data = json.loads((out_dir / "lineage.json").read_text())
    except (OSError, ValueError):
        return []
    lines = [
        "## Lineage",
        "",
        f"Made by recipe `{data.get('recipe')}` (`forge recipe={data.get('recipe')}`), step by step:",
        "",
        "| step | stage | fingerprint | reads | in | kept | rejected | seconds | settings |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    chain = data.get("steps") or []
    for s in chain:
        c = s.get("counts") or {}
        if not c and s is chain[-1]:  # this run dir's own step: its stats.json is written by now
            from forge.recipe.records import counts_of

            c = counts_of(out_dir)
        by = ", ".join(f"{k}: {v}" for k, v in (c.get("rejected_by") or {}).items())
        rejected = f"{c.get('rejected', '')}" + (f" ({by})" if by else "")
        settings = json.dumps((s.get("settings") or {}).get("set") or {}, sort_keys=True)
        groups = ", ".join(f"{k}={v}" for k, v in ((s.get("settings") or {}).get("groups") or {}).items())
        reads = ", ".join(map(str, s.get("inputs") or []))
        lines.append(
            f"| {s.get('step')} | {s.get('stage')} | `{s.get('fingerprint')}` | {reads} "
            f"| {c.get('in', '')} | {c.get('kept', '')} | {rejected} | {s.get('seconds') or ''} "
            f"| {groups}{' ' if groups else ''}`{settings}` |"
        )
    return [*lines, ""]
