"""The one registry of stages: a stage's name -> its config groups, the object the run lifecycle
drives, its workflow steps, its finish, its card section and its Slurm steps.

Adding a stage is one package under forge/stages/, one entry here and one conf/pipeline/ file:
the root schema (forge/config.py) takes the groups from here, the run lifecycle
(forge/run/runner.py) and Slurm (forge/cluster/) take everything else by name. Code is named as
"module:attribute" and imported only when a run of that stage needs it, so this module imports
nothing but the stages' schemas (which import nothing of forge but forge/schema.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from forge.stages.curate.config import CurateConfig
from forge.stages.dedup.config import DedupConfig
from forge.stages.generate.config import GenerationConfig, PromptConfig
from forge.stages.generate.rollout.config import RolloutConfig
from forge.stages.score.config import ClassifierConfig, ScoreConfig
from forge.stages.tokenize.config import TokenizeConfig

BATCH_RUN = "forge.run.batch_run:BatchRun"


@dataclass(frozen=True)
class StageSpec:
    """One stage.

    Attributes:
        groups: the config groups it owns, `{key: schema dataclass}` (`forge pipeline=NAME` sets
            `pipeline.stage`; the knobs are under these keys).
        run: "module:factory" of the object run_forge drives, built as factory(cfg): prepare(),
            start(), run_task(task), finish(hub_repo), partial_stats() (GenerationRun,
            forge/stages/generate/run.py). A batch stage leaves the default: forge/run/batch_run.py.
        batch: a batch stage's transformation, "module:Class" built as Class(cfg, mix), with
            process(batch), fingerprint(), restore() (forge/run/batch.py runs it).
        validate: "module:function(cfg)": cross-field checks across its groups and the root ones
            (ConfigError naming the key); a group's own checks are its schema's validate() method.
        workflow: steps over the whole input before the per-shard tasks, "module:Class" built as
            Class(cfg, mix, stage, manifest) (forge/stages/dedup/steps.py).
        planned_steps: "module:function(cfg) -> [(step, tasks)]": the workflow's steps known from
            the config alone (Slurm submits a recipe's later steps before their input exists).
        finish: "module:function(out_dir, stats)": its work once every shard is done, and its part
            of stats.json.
        card: "module:function(stats) -> [Markdown lines]": its section of a batch stage's card
            (forge/run/stage_card.py).
        render_card: "module:function(out_dir, hub_repo, progress) -> str": the whole card, for a
            stage whose card is its own (generation); null = the batch stages' card.
        uses: the shared groups beyond pipeline, dataset, output, run and cluster that its
            results depend on (a recipe step's fingerprint hashes only those and its own).
        verb: what the stage did to the rows its card counts ("Rows curated by forge: ...").
        dir_name: what the default run dir is named after: `stage` (`curate__sample`) or `model`
            (`tiny-qwen3__sample`: a generation run is known by its model).
        published: files and folders of its run dir that Hub publishing adds to the chunks of
            data/, rejected/ and pools/ (tokenize: the token shards and index.json).
        reads: what each input row must be: `prompts` (a column of prompts) or `rows` (any
            dataset, brought into the curated schema).
    """

    groups: dict[str, type] = field(default_factory=dict)
    run: str = BATCH_RUN
    batch: str | None = None
    validate: str | None = None
    workflow: str | None = None
    planned_steps: str | None = None
    finish: str | None = None
    card: str | None = None
    render_card: str | None = None
    uses: tuple[str, ...] = ("model",)
    verb: str = "processed"
    dir_name: str = "stage"
    published: tuple[str, ...] = ()
    reads: str = "rows"


STAGES: dict[str, StageSpec] = {
    "generate": StageSpec(
        groups={"prompt": PromptConfig, "generation": GenerationConfig, "rollout": RolloutConfig},
        run="forge.stages.generate.run:GenerationRun",
        validate="forge.stages.generate.checks:validate_generate",
        uses=("model", "judge_model"),
        verb="generated",
        render_card="forge.stages.generate.card:render_generation_card",
        dir_name="model",
        reads="prompts",
    ),
    "curate": StageSpec(groups={"curate": CurateConfig}, batch="forge.stages.curate.stage:CurateStage", verb="curated"),
    "dedup": StageSpec(
        groups={"dedup": DedupConfig},
        batch="forge.stages.dedup.stage:DedupStage",
        uses=(),
        verb="deduplicated",
        workflow="forge.stages.dedup.semantic:workflow",
        planned_steps="forge.stages.dedup.semantic:planned_steps",
        finish="forge.stages.dedup.report:add_report",
        card="forge.stages.dedup.report:card_lines",
    ),
    "tokenize": StageSpec(
        groups={"tokenize": TokenizeConfig},
        batch="forge.stages.tokenize.stage:TokenizeStage",
        verb="tokenized",
        finish="forge.stages.tokenize.shards:add_report",
        card="forge.stages.tokenize.shards:card_lines",
        published=("tokens", "index.json"),
    ),
    "score": StageSpec(
        groups={"score": ScoreConfig, "classifier": ClassifierConfig},
        batch="forge.stages.score.stage:ScoreStage",
        verb="scored",
        finish="forge.stages.score.report:add_report",
        card="forge.stages.score.report:card_lines",
    ),
}
DEFAULT_STAGE = "generate"


def load(ref: str) -> Any:
    """The attribute a "module:attribute" reference names (imported now)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def spec(stage: object) -> StageSpec:
    """The registry entry of a stage name (KeyError: not a stage)."""
    return STAGES[str(getattr(stage, "value", stage))]


def stage_groups() -> dict[str, type]:
    """Every stage's config groups, `{key: schema}` (the root schema has one field per key)."""
    return {key: schema for s in STAGES.values() for key, schema in s.groups.items()}


def stage_run(cfg: Any) -> Any:
    """The object run_forge drives for cfg.pipeline.stage."""
    s = spec(cfg.pipeline.stage)
    if s.batch is not None:
        return load(s.run)(cfg, load(s.batch))
    return load(s.run)(cfg)


def hook(stage: object, name: str) -> Any:
    """A stage's optional function (`finish`, `card`, `validate`, ...), or None."""
    try:
        ref = getattr(spec(stage), name)
    except KeyError:
        return None
    return load(ref) if ref else None
