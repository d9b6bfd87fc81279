"""A run dir's dataset card (README.md, also the Hub's): rendered by its stage's card function,
named in the registry (generation's own, forge/stages/generate/card.py; a batch stage's,
forge/run/stage_card.py, with the stage's section), and written with every secret masked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from forge.io.secrets import redact_text
from forge.stages.registry import DEFAULT_STAGE, load, spec


def render_card(out_dir: Path, hub_repo: str | None = None, progress: dict[str, Any] | None = None) -> str:
    """The card of the run dir's stage; `progress` for a run still going on (a progress section)."""
    cfg = yaml.safe_load((out_dir / "config.yaml").read_text()) or {}
    stage = (cfg.get("pipeline") or {}).get("stage", DEFAULT_STAGE)
    s = spec(stage)
    if s.render_card is not None:
        return load(s.render_card)(out_dir, hub_repo, progress)
    from forge.run.stage_card import render_stage_card

    stats_path = out_dir / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    return render_stage_card(out_dir, stats, hub_repo)


def write_card(out_dir: Path, hub_repo: str | None = None) -> Path:
    path = out_dir / "README.md"
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text(redact_text(render_card(out_dir, hub_repo)))
    tmp.replace(path)
    return path
