"""A recipe on Slurm: every step that must run is submitted from one command as its own arrays
(a workflow's step arrays, the shard array, monitor, finalize: forge/cluster/slurm.py), the first
of them `afterok` on the finalize jobs of the steps it reads. A failed task cancels its
dependents (kill-on-invalid-dep); a re-run skips finished steps, leaves queued or running ones
alone (never a second submission) and resubmits only what is missing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from forge.recipe.lineage import _say, finish_recipe, record_finished, settled, start_step
from forge.recipe.plan import RUNNING, StepPlan
from forge.recipe.records import Records
from forge.recipe.steps import Step


def _active_finalize(step_dir: Path) -> tuple[list[str], str | None]:
    """Jobs of the step dir still queued or running, and the finalize job that ends them."""
    from forge.cluster.state import active_jobs, load_history

    if not (step_dir / "slurm").is_dir():
        return [], None
    active = active_jobs(step_dir)
    if not active:
        return [], None
    history = load_history(step_dir)
    return sorted(active), (history[-1].finalize_id if history else None)


def submit_recipe(
    cfg: Any, steps: list[Step], plans: list[StepPlan], chosen: list[StepPlan], overrides: list[str]
) -> int:
    """Submit the chosen steps that must run, chained by afterok; wait with cluster.wait."""
    from forge.cluster.slurm import submit_run
    from forge.cluster.state import SlurmError

    recipe, root = cfg.recipe, Path(cfg.recipe.dir)
    records = Records(root)
    ends: dict[str, str] = {}  # step -> the finalize job its dependents wait for
    for p in chosen:
        s = p.step
        if settled(records, p):
            continue
        try:
            live, finalize = _active_finalize(s.dir.resolve())
        except SlurmError as exc:
            _say(f"error: {exc}")
            return 1
        if live:
            _say(
                f"step {s.name} ({s.stage}): already queued or running as job(s) {', '.join(live)}; not submitted again"
            )
            if finalize:
                ends[s.name] = finalize
            continue
        if p.action == RUNNING:  # a local forge writes it, not a job of ours
            _say(f"error: step {s.name}: {p.why}; re-run once it has ended")
            return 1
        after = [ends[i] for i in s.inputs if i in ends]
        _say(
            f"step {s.name} ({s.stage}): {p.action}: {p.why}" + (f"; after job(s) {', '.join(after)}" if after else "")
        )
        start_step(records, s, recipe, steps)
        code, sub = submit_run(s.cfg, s.raw, [*overrides, f"recipe.only={s.name}"], after or None)
        if code:
            _say(f"recipe {recipe.name}: step {s.name} not submitted; earlier steps stay queued")
            return code
        if sub is not None:
            ends[s.name] = sub.finalize_id
    if not ends:  # nothing queued or running: every chosen step is done
        if recipe.only is None:
            finish_recipe(cfg, steps)
        else:
            record_finished(cfg, steps, [p.step for p in chosen])
        return 0
    if not cfg.cluster.wait:
        _say(f"follow the recipe: forge-status {root}")
        return 0
    return wait_recipe(cfg, steps, ends)


def wait_recipe(cfg: Any, steps: list[Step], ends: dict[str, str], poll_s: float = 3.0) -> int:
    """cluster.wait: block until every step's finalize job has ended; 0 when every step finished."""
    from forge.cluster.state import ACTIVE, SlurmError, job_states
    from forge.run.output import is_finished

    recipe = cfg.recipe
    ids = list(ends.values())
    t0 = last = time.monotonic()
    while ids:
        try:
            live = [j for j, st in job_states(ids).items() if st in ACTIVE]
        except SlurmError as exc:
            _say(f"warning: {exc}")
            live = ids
        if not live:
            break
        if time.monotonic() - last > 60:
            last = time.monotonic()
            _say(f"waiting: {len(live)} step(s) queued or running ({time.monotonic() - t0:.0f} s)")
        time.sleep(poll_s)
    missing = [s for s in steps if s.name in ends and not is_finished(s.dir.resolve())]
    for s in missing:
        _say(f"step {s.name}: not complete; forge-status {s.dir}")
    if missing:
        _say(f"recipe {recipe.name} not complete; re-run the same command to resubmit what is missing")
        return 1
    if recipe.only is None:
        finish_recipe(cfg, steps)
    else:
        record_finished(cfg, steps, [s for s in steps if s.name in ends])
    return 0
