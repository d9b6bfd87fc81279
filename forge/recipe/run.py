"""`forge recipe=NAME`: compose every step, plan, then run the steps that must run, in order,
each through the same run lifecycle as a single-stage run (forge/run/runner.py), locally or as
dependent Slurm arrays (forge/recipe/slurm.py)."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from forge.io.secrets import redact, register_config_secrets
from forge.recipe.lineage import _say, end_step, finish_recipe, settled, start_step
from forge.recipe.plan import REUSE, RUNNING, UP_TO_DATE, StepPlan, plan
from forge.recipe.records import Records
from forge.recipe.steps import Step, build_steps
from forge.schema import ConfigError
from forge.storage.fs import is_remote

log = logging.getLogger("forge.recipe")


def save_recipe(recipe: Any, raw: DictConfig | dict, root: Path) -> None:
    """recipe.yaml: the resolved recipe, as the steps were composed from it (secrets masked)."""
    data = OmegaConf.to_container(raw.recipe, resolve=True) if isinstance(raw, DictConfig) else raw.get("recipe")
    text = yaml.safe_dump(redact(data), sort_keys=False)
    path = root / "recipe.yaml"
    if not path.exists() or path.read_text() != text:
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def prepare(cfg: Any, overrides: list[str]) -> tuple[list[Step], list[StepPlan]] | int:
    """Steps composed and planned, or the exit code of a refusal (one line printed)."""
    recipe = cfg.recipe
    try:
        steps = build_steps(recipe, overrides)
    except ConfigError as exc:
        print(f"forge: error: {exc}", file=sys.stderr)
        return 2
    for s in steps:  # a secret in one step's settings is masked in every line this command prints
        register_config_secrets(OmegaConf.to_container(s.raw, resolve=True))
    names = [s.name for s in steps]
    if recipe.only is not None and recipe.only not in names:
        print(f"forge: error: recipe.only: no step {recipe.only!r}; steps: {', '.join(names)}", file=sys.stderr)
        return 2
    return steps, plan(steps, Path(recipe.dir))


def selected(plans: list[StepPlan], only: str | None, recipe_name: str) -> list[StepPlan] | str:
    """The steps this command runs: all, or recipe.only's (whose inputs must be up to date)."""
    if only is None:
        return plans
    by_name = {p.step.name: p for p in plans}
    target = by_name[only]
    for name in target.step.inputs:
        p = by_name[name]
        if p.action not in (UP_TO_DATE, REUSE):
            return (
                f"recipe.only={only}: its input step {name} is not up to date ({p.action}: {p.why}); "
                f"run `forge recipe={recipe_name}` to bring it up to date first"
            )
    return [target]


def run_recipe(cfg: Any, raw: DictConfig | dict, overrides: list[str]) -> int:
    """Run (or plan, or submit) a recipe; returns the exit code."""
    from forge.run.runner import setup_logging

    setup_logging()
    recipe = cfg.recipe
    if is_remote(recipe.dir):  # its links and state.json need a file system; its steps read remote inputs
        print(
            f"forge: error: recipe.dir: {recipe.dir} is on an object store; a recipe dir must be local "
            "(its steps' inputs may be remote, and forge-pull brings a remote run dir down)",
            file=sys.stderr,
        )
        return 2
    recipe.dir = str(Path(recipe.dir).absolute())  # one spelling of every step's dir, whatever the cwd form
    root = Path(recipe.dir)
    register_config_secrets(OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else raw)
    if recipe.keep < 0:
        print(f"forge: error: recipe.keep: must be >= 0 (got {recipe.keep})", file=sys.stderr)
        return 2
    prepared = prepare(cfg, overrides)
    if isinstance(prepared, int):
        return prepared
    steps, plans = prepared
    if recipe.plan:
        try:
            _say(f"recipe {recipe.name}: {len(steps)} steps in {root}")
            for p in plans:
                print(f"  {p.line()}", flush=True)
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    chosen = selected(plans, recipe.only, recipe.name)
    if isinstance(chosen, str):
        print(f"forge: error: {chosen}", file=sys.stderr)
        return 2
    final = steps[-1]
    if recipe.hub_repo:  # a bad token or repo fails now, before any step runs
        from forge.io.hub import HubError, preflight, target_from

        final.cfg.output.hub_repo = recipe.hub_repo
        final.raw.output.hub_repo = recipe.hub_repo
        try:
            preflight(target_from(final.cfg.output))
        except HubError as exc:
            print(f"forge: error: recipe.hub_repo: {exc}", file=sys.stderr)
            return 2
    if recipe.only is None:
        Records(root).plan(recipe.name, {s.name: s.fingerprint for s in steps})
    if cfg.cluster.backend.value == "slurm":
        from forge.recipe.slurm import submit_recipe

        save_recipe(recipe, raw, root)
        return submit_recipe(cfg, steps, plans, chosen, overrides)
    save_recipe(recipe, raw, root)
    code = run_local(cfg, steps, chosen, overrides)
    if code == 0 and recipe.only is None:
        finish_recipe(cfg, steps)
        if recipe.hub_repo and not any(p.step is final and p.runs for p in chosen):
            return publish(final)  # the final step ran earlier: publish what it holds now
    return code


def publish(final: Step) -> int:
    """The final step's data, stats and card (with the whole chain) to recipe.hub_repo."""
    from forge.io.hub import HubError, publish_final, repo_url, target_from

    try:
        publish_final(final.dir, target_from(final.cfg.output))
    except HubError as exc:
        print(f"forge: error: {exc}", file=sys.stderr)
        return 1
    _say(f"published {final.name} to {repo_url(final.cfg.output.hub_repo)}")
    return 0


def run_local(cfg: Any, steps: list[Step], chosen: list[StepPlan], overrides: list[str]) -> int:
    """Each chosen step in order: skipped when up to date, else run in this process."""
    from forge.run.runner import run_forge

    recipe, root = cfg.recipe, Path(cfg.recipe.dir)
    records = Records(root)
    for p in chosen:
        s = p.step
        if settled(records, p):
            continue
        if p.action == RUNNING:
            print(f"forge: error: step {s.name}: {p.why}; re-run once it has ended", file=sys.stderr)
            return 1
        _say(f"step {s.name} ({s.stage}): {p.action}: {p.why} -> {s.dir}")
        start_step(records, s, recipe, steps)
        t0 = time.monotonic()
        code = run_forge(s.cfg, s.raw, overrides=[*overrides, f"recipe.only={s.name}"])
        if code:
            _say(f"recipe {recipe.name} stopped at step {s.name}; re-run the same command to resume it")
            return code
        end_step(records, s, time.monotonic() - t0)
    return 0
