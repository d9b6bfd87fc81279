"""What every card shares (forge/run/card.py for generation, forge/run/stage_card.py for batch
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
