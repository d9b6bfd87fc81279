"""The `recipe:` group's schema (conf/recipe/*.yaml): the steps of a pipeline and how it is run.
Imports nothing of forge but forge/schema.py: the root schema (forge/config.py) includes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from forge.schema import neutral


@dataclass
class StepConfig:
    """One step of a recipe.

    Attributes:
        stage: the stage it runs (a name in forge/stages/registry.py).
        input: what it reads: earlier step names and/or datasets (any `dataset.name`: a local
            file, directory, glob, Hub id, `forge://sample`). Several entries make a mix; an entry
            may be a mapping `{name: STEP_OR_DATASET, weight: 2, label: ..., max_rows: ...}`
            (a dataset.sources entry). Empty: the step's own `dataset` settings.
        groups: config group choices for this step, `{model: tiny_cpu, rollout: judge}`.
        set: settings merged onto this step's config, as in a config file:
            `{dedup: {minhash: {threshold: 0.8}}}`; override one from the command line with
            `recipe.steps.STEP.set.dedup.minhash.threshold=0.8`.
    """

    stage: str = "???"
    input: list[Any] = field(default_factory=list)
    groups: dict[str, str] = field(default_factory=dict)
    set: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecipeConfig:
    """A recipe (forge/recipe/): `forge recipe=NAME`.

    Attributes:
        name: the recipe's name; null = no recipe (a single-stage run).
        dir: the recipe dir: `recipe.json` (the resolved recipe), `lineage.json`, one link per
            step to its current output, and every step's outputs under `steps/STEP/FINGERPRINT/`.
        steps: the steps, in the order they are listed; a step may read only earlier ones.
        plan: print each step (up to date / will run, and why) and run nothing.
        only: run this one step; refused, naming it, if an input step is not up to date.
        keep: outputs kept per step besides the current one (the most recently used); older ones
            are removed once the recipe finishes. Switching a setting back within them reuses
            the output. 0 = keep only the current ones.
        hub_repo: publish the final step's data (and its card, with the whole chain) to this
            Hub dataset repo once the recipe finishes.
    """

    name: str | None = None
    dir: str = "outputs/${recipe.name}"
    steps: dict[str, StepConfig] = field(default_factory=dict)
    plan: bool = neutral(False)
    only: str | None = neutral(None)
    keep: int = neutral(3)
    hub_repo: str | None = neutral(None)
