"""`forge-status RECIPE_DIR`: every step of a recipe: its state, rows in / kept / rejected, its
Slurm job ids, and what is stale (an output older than the one the last command planned, or made
from inputs that are no longer their steps' current outputs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from forge.recipe.records import STATE, Records, counts_of
from forge.run.locks import running_holder
from forge.run.output import is_finished


def is_recipe_dir(path: Path) -> bool:
    return (path / STATE).exists() or (path / "recipe.yaml").exists()


def _jobs(step_dir: Path) -> tuple[list[str], list[str]]:
    """(every job id of the dir's last Slurm submission, those still queued or running)."""
    from forge.cluster.state import ACTIVE, SlurmError, job_states, load_history

    history = load_history(step_dir) if (step_dir / "slurm").is_dir() else []
    if not history:
        return [], []
    ids = history[-1].job_ids()
    try:
        states = job_states(ids)
    except SlurmError:
        return ids, []
    return ids, [j for j in ids if states.get(j) in ACTIVE]


def step_state(step_dir: Path) -> str:
    if not step_dir.is_dir():
        return "not started"
    if is_finished(step_dir) and (step_dir / "stats.json").exists():
        return "finished"
    _, live = _jobs(step_dir)
    if live:
        return "queued/running on Slurm"
    holder = running_holder(step_dir)
    if holder:
        return f"running ({holder})"
    return "unfinished (re-run to resume)" if (step_dir / "state").is_dir() else "submitted"


def recipe_status(root: Path) -> list[dict[str, Any]]:
    """One row per step, in the recipe's order."""
    records = Records(root)
    state = records.state()
    order = state.get("order") or list((state.get("planned") or state.get("current") or {}).keys())
    current, planned = state.get("current") or {}, state.get("planned") or {}
    rows = []
    for name in order:
        fp = planned.get(name) or current.get(name)
        step_dir = root / "steps" / name / fp if fp else root / "steps" / name
        record = records.get(name, fp) if fp else None
        stale = []
        if current.get(name) and fp != current.get(name):
            stale.append(f"its current output {current[name]} is not the one the last full command planned ({fp})")
        for inp, ident in ((record or {}).get("inputs") or {}).items():
            if inp in current and isinstance(ident, str) and ident != current[inp]:
                stale.append(f"input {inp} changed since")
        ids, live = _jobs(step_dir) if fp else ([], [])
        rows.append(
            {
                "step": name,
                "stage": (record or {}).get("stage", ""),
                "fingerprint": fp or "-",
                "state": step_state(step_dir) if fp else "not started",
                "counts": counts_of(step_dir) if fp else {},
                "jobs": ids,
                "live_jobs": live,
                "stale": stale,
            }
        )
    return rows


def print_status(root: Path) -> int:
    rows = recipe_status(root)
    name = json.loads((root / STATE).read_text()).get("recipe", root.name) if (root / STATE).exists() else root.name
    print(f"{root}: recipe {name}, {len(rows)} step(s)")
    print(f"  {'step':<12} {'stage':<9} {'fingerprint':<17} {'state':<30} {'in':>7} {'kept':>7} {'rejected':>8}  jobs")
    for r in rows:
        c = r["counts"]
        jobs = ",".join(r["jobs"]) or "-"
        print(
            f"  {r['step']:<12} {r['stage']:<9} {r['fingerprint']:<17} {r['state']:<30} "
            f"{c.get('in', '-'):>7} {c.get('kept', '-'):>7} {c.get('rejected', '-'):>8}  {jobs}"
        )
        by = c.get("rejected_by") or {}
        if by:
            print(f"  {'':<12} rejected by: {', '.join(f'{k} {v}' for k, v in by.items())}")
        for s in r["stale"]:
            print(f"  {'':<12} stale: {s}")
    done = sum(r["state"] == "finished" and not r["stale"] for r in rows)
    print(f"{done}/{len(rows)} step(s) finished and up to date")
    return 0
