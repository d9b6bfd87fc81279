"""A step's lineage, kept as it runs: its record when it starts and when it ends, the chain of
steps so far in its run dir (lineage.json, shown by its card), and the recipe's finish (the
recipe's lineage.json, current outputs, old outputs collected)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from forge.io.secrets import redact
from forge.recipe.records import Records, counts_of, now
from forge.recipe.steps import Step
from forge.run.output import write_json_atomic


def _say(text: str) -> None:
    print(f"forge: {text}", flush=True)


def lineage(steps: list[Step], root: Path, upto: str | None = None, name: str | None = None) -> dict[str, Any]:
    """The chain of steps (up to and including `upto`): fingerprint, dir, inputs, counts, times,
    the settings the recipe gives it and the command line's overrides that applied to it."""
    records = Records(root)
    chain = []
    for s in steps:
        record = records.get(s.name, s.fingerprint) or {}
        chain.append(
            {
                "step": s.name,
                "stage": s.stage,
                "fingerprint": s.fingerprint,
                "dir": str(s.dir),
                "inputs": s.inputs or list(s.input_ids),
                "counts": record.get("counts") or counts_of(s.dir),
                "started_at": record.get("started_at"),
                "finished_at": record.get("finished_at"),
                "seconds": record.get("seconds"),
                "settings": record.get("key_settings"),
            }
        )
        if s.name == upto:
            break
    return {"recipe": name or records.state().get("recipe") or root.name, "written_at": now(), "steps": chain}


def key_settings(step: Step, recipe: Any) -> dict[str, Any]:
    """What the recipe sets for a step (its group choices and `set:`) and the command line's
    overrides that reached it (they win over the recipe file); secrets masked."""
    from forge.io.secrets import redact_override

    spec = recipe.steps[step.name]
    plain = OmegaConf.to_container(spec.set, resolve=True) if isinstance(spec.set, DictConfig) else spec.set
    applied = {"groups": dict(spec.groups), "set": plain}
    if step.overrides:
        applied["overrides"] = [redact_override(o) for o in step.overrides]
    return redact(applied)


def start_step(records: Records, s: Step, recipe: Any, steps: list[Step]) -> None:
    """Its record (settings and inputs, for the plan's `why`) and the chain so far, in its run dir."""
    record = records.get(s.name, s.fingerprint) or {
        "fingerprint": s.fingerprint,
        "step": s.name,
        "stage": s.stage,
        "created_at": now(),
    }
    record.update(settings=redact(s.settings), inputs=s.input_ids, key_settings=key_settings(s, recipe))
    record.setdefault("started_at", now())
    records.put(s.name, s.fingerprint, record)
    s.dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(s.dir / "lineage.json", lineage(steps, records.root, upto=s.name, name=recipe.name))


def refresh_lineage(s: Step, steps: list[Step], root: Path, name: str | None = None) -> None:
    """A Slurm step's chain was written before its inputs ran: once it is done, its lineage.json
    gets their counts and its card is rendered again."""
    from forge.run.card import write_card

    write_json_atomic(s.dir / "lineage.json", lineage(steps, root, upto=s.name, name=name))
    write_card(s.dir, s.cfg.output.hub_repo)


def end_step(records: Records, s: Step, seconds: float) -> None:
    record = records.get(s.name, s.fingerprint) or {"fingerprint": s.fingerprint}
    record.update(finished_at=now(), seconds=round(seconds + (record.get("seconds") or 0), 1), counts=counts_of(s.dir))
    records.put(s.name, s.fingerprint, record)
    records.make_current(s.name, s.fingerprint)


def record_finished(cfg: Any, steps: list[Step], only: list[Step] | None = None) -> None:
    """Steps a Slurm finalize job finished (their records have no end yet): their end, counts and
    chain recorded, their cards rendered again, and each made the step's current output."""
    from forge.run.output import is_finished

    root = Path(cfg.recipe.dir)
    records = Records(root)
    for s in only or steps:
        if not is_finished(s.dir):
            continue
        record = records.get(s.name, s.fingerprint)
        if record is not None and "finished_at" not in record:
            end_step(records, s, 0.0)
            refresh_lineage(s, steps, root, cfg.recipe.name)
        records.make_current(s.name, s.fingerprint)


def finish_recipe(cfg: Any, steps: list[Step]) -> None:
    """The recipe's lineage.json, old outputs beyond recipe.keep removed, a summary line."""
    root = Path(cfg.recipe.dir)
    records = Records(root)
    record_finished(cfg, steps)
    data = lineage(steps, root, name=cfg.recipe.name)
    old = root / "lineage.json"
    try:
        same = yaml.safe_load(old.read_text()) if old.exists() else None
    except (OSError, yaml.YAMLError):
        same = None
    if not same or same.get("steps") != data["steps"]:
        write_json_atomic(old, data)
    removed = records.collect([s.name for s in steps], cfg.recipe.keep)
    if removed:
        _say(f"removed {len(removed)} old step output(s) beyond recipe.keep={cfg.recipe.keep}")
    last = steps[-1]
    c = counts_of(last.dir)
    _say(
        f"recipe {cfg.recipe.name}: {len(steps)} steps up to date; final step {last.name}: "
        f"{c.get('kept', 0)} rows in {root / last.name} ({last.dir}); lineage: {old}"
    )


def settled(records: Records, p: Any) -> bool:
    """A step whose output exists (up to date, or an earlier output reused): say so, make it the
    current one, and return True; else False (it must run)."""
    from forge.recipe.plan import REUSE, UP_TO_DATE

    if p.action not in (UP_TO_DATE, REUSE):
        return False
    s = p.step
    _say(f"step {s.name} ({s.stage}): {p.action} ({s.fingerprint}){': ' + p.why if p.why else ''}")
    records.make_current(s.name, s.fingerprint)
    return True
