"""What each step of a recipe will do, and why: up to date, reuse an earlier output, resume, or
run (because a setting or an input changed, or it never ran). Reads only; starts nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forge.cluster.state import live_job_ids as slurm_jobs
from forge.io.secrets import redact
from forge.recipe.fingerprint import changes
from forge.recipe.records import Records
from forge.recipe.steps import Step
from forge.run.locks import running_holder
from forge.run.output import is_finished

UP_TO_DATE, REUSE, RESUME, RUN, RUNNING = "up to date", "reuse", "resume", "will run", "running"


@dataclass
class StepPlan:
    step: Step
    action: str  # one of the names above
    why: str

    @property
    def runs(self) -> bool:
        return self.action in (RESUME, RUN, RUNNING)

    def line(self) -> str:
        s = self.step
        head = f"{s.name:<12} {s.stage:<9} {s.fingerprint}  {self.action}"
        return f"{head}: {self.why}" if self.why else head


def _why_run(step: Step, records: Records, planned: dict[str, StepPlan]) -> str:
    changed = [i for i in step.inputs if planned[i].runs]
    if changed:
        return f"input {changed[0]} {'runs' if planned[changed[0]].action != RUNNING else 'is running'}"
    previous = records.current(step.name)
    last = records.get(step.name, previous) if previous else None
    if last is None:
        others = records.all_of(step.name)
        last = others[0] if others else None
    if last is None:
        return "never run"
    mine = redact(step.settings)  # records hold masked settings: compare (and print) masked ones
    if last.get("settings") != mine:
        return "settings changed: " + changes(last.get("settings") or {}, mine)
    for name, ident in step.input_ids.items():
        if (last.get("inputs") or {}).get(name) != ident:
            return f"input {name} changed"
    return "its earlier output was removed"


def plan(steps: list[Step], root: Path) -> list[StepPlan]:
    """One StepPlan per step, in order."""
    records = Records(root)
    planned: dict[str, StepPlan] = {}
    for s in steps:
        holder = running_holder(s.dir) if s.dir.is_dir() else None
        jobs = slurm_jobs(s.dir)
        if jobs:
            p = StepPlan(s, RUNNING, f"queued or running on Slurm as job(s) {', '.join(jobs)}")
        elif holder:
            p = StepPlan(s, RUNNING, f"being written by {holder}")
        elif is_finished(s.dir) and (s.dir / "stats.json").exists():
            current = records.current(s.name)
            if current in (None, s.fingerprint):
                p = StepPlan(s, UP_TO_DATE, "")
            else:
                record = records.get(s.name, s.fingerprint) or {}
                when = record.get("finished_at", "earlier")
                p = StepPlan(s, REUSE, f"output of {when} has these settings (nothing recomputed)")
        elif (s.dir / "state").is_dir():
            p = StepPlan(s, RESUME, "interrupted; resumes where it stopped")
        else:
            p = StepPlan(s, RUN, _why_run(s, records, planned))
        planned[s.name] = p
    return list(planned.values())
