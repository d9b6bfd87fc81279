"""A recipe's steps, each composed into a whole, validated forge config before anything runs.

A step's config is what `forge pipeline=STAGE <its groups> <the command line's other overrides>`
composes, with the step's `set:` merged on top and its input and output filled in: a mistake in
one step stops the recipe before it starts, naming the step and the key.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from forge.compose import compose, one_line, to_schema
from forge.recipe.fingerprint import STEP_INPUT, dataset_identity, fingerprint, step_settings
from forge.schema import ConfigError
from forge.stages.registry import STAGES


@dataclass
class Step:
    """One composed step: its typed config (output.dir = its fingerprinted dir) and raw config."""

    name: str
    stage: str
    cfg: Any
    raw: DictConfig
    inputs: list[str]  # earlier steps it reads
    fingerprint: str
    settings: dict[str, Any]
    input_ids: dict[str, Any]
    overrides: list[str] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return Path(self.cfg.output.dir)


def recipe_overrides(overrides: list[str]) -> list[str]:
    """The command line's overrides that apply to every step: all but the recipe's own and Hydra's.
    output.dir and pipeline are each step's own (a note says they are ignored)."""
    keep = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key == "recipe" or key.startswith(("recipe.", "hydra.")):
            continue
        if key in ("output.dir", "pipeline", "pipeline.stage"):
            print(f"forge: note: {o} is ignored in a recipe: each step has its stage and its dir under recipe.dir")
            continue
        keep.append(o)
    return keep


def _inputs(name: str, entries: list[Any], known: dict[str, Step]) -> list[dict[str, Any]]:
    """Each input as a dataset.sources entry: {name, ...}; `step` set when it is an earlier step."""
    out = []
    for i, entry in enumerate(entries):
        src = dict(entry) if isinstance(entry, dict) else {"name": entry}
        if not isinstance(src.get("name"), str) or not src["name"]:
            raise ConfigError(f"recipe.steps.{name}.input[{i}]: needs a step or dataset name (got {entry!r})")
        if src["name"] in known:
            src["step"] = src["name"]
        elif src["name"] == name:
            raise ConfigError(f"recipe.steps.{name}.input[{i}]: a step cannot read itself")
        elif not _looks_like_dataset(src["name"]):
            raise ConfigError(
                f"recipe.steps.{name}.input[{i}]: {src['name']!r} is neither an earlier step "
                f"({', '.join(known) or 'none'}) nor an existing file, dir or glob, nor a Hub id (org/name)"
            )
        out.append(src)
    return out


def _looks_like_dataset(name: str) -> bool:
    """A local file, dir or glob that exists, a `scheme://` name, or a Hub id (`org/name`)."""
    import glob

    return "://" in name or "/" in name or Path(name).expanduser().exists() or bool(glob.glob(name))


def _set_input(cfg: DictConfig, sources: list[dict[str, Any]], dirs: dict[str, str], mixes: bool) -> None:
    """dataset.name (one input) or dataset.sources (a mix, for a stage that reads mixes); `dirs`
    maps a step to what stands for it. A step read by a batch stage is a source labelled with the
    step's name (rows, stats and token streams say `curate`, not a fingerprinted path)."""
    if not sources:
        return
    named = [{**s, "name": dirs.get(s.get("step"), s["name"])} for s in sources]
    for s, orig in zip(named, sources, strict=True):
        if orig.get("step") and mixes:
            s.setdefault("label", orig["step"])
        s.pop("step", None)
    if len(named) == 1 and set(named[0]) == {"name"}:
        cfg.dataset.name = named[0]["name"]
        return
    if not mixes:
        raise ConfigError(
            f"dataset.sources: stage {cfg.pipeline.stage} reads one input (a dataset or a step), not a mix"
        )
    for s, orig in zip(named, sources, strict=True):
        s.setdefault("label", orig["name"])
    from forge.config import SourceSpec

    try:
        cfg.dataset.sources = [OmegaConf.merge(OmegaConf.structured(SourceSpec), s) for s in named]
    except OmegaConfBaseException as exc:
        raise ConfigError(one_line(exc)) from None


def build_steps(recipe: Any, overrides: list[str]) -> list[Step]:
    """Every step composed, validated and fingerprinted, in order (ConfigError names step and key)."""
    if not recipe.steps:
        raise ConfigError(f"recipe.steps: recipe {recipe.name!r} has no steps")
    common = recipe_overrides(overrides)
    root = Path(recipe.dir).absolute()  # step inputs are pinned by path in each run dir
    steps: dict[str, Step] = {}
    for name, step in recipe.steps.items():
        where = f"recipe.steps.{name}"
        if step.stage not in STAGES:
            raise ConfigError(f"{where}.stage: no stage {step.stage!r}; stages: {', '.join(STAGES)}")
        sources = _inputs(name, list(step.input), steps)
        for s in sources:
            if "step" not in s and s["name"] in recipe.steps:
                raise ConfigError(f"{where}.input: step {s['name']!r} comes after {name!r}; list it first")
        given = {o.split("=", 1)[0].lstrip("+~") for o in common}
        groups = [f"{g}={v}" for g, v in step.groups.items() if g not in given]  # the command line wins
        own = [f"pipeline={step.stage}", *groups]
        try:
            cfg = compose([*own, *common])
            _open_free_maps(cfg)
            cfg = OmegaConf.merge(cfg, OmegaConf.create(_plain(step.set)))
            reapply(cfg, common)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{where}: {one_line(exc)}") from None
        except Exception as exc:  # Hydra's own: an unknown group option
            raise ConfigError(f"{where}.groups: {one_line(exc)}") from None
        with open_dict(cfg):
            mixes = STAGES[step.stage].reads == "rows"
            try:
                _set_input(cfg, sources, {s: f"{STEP_INPUT}{s}" for s in steps}, mixes)
            except ConfigError as exc:
                raise ConfigError(f"{where}.input: {exc}") from None
            cfg.output.dir = str(root / "steps" / name / "pending")
        try:
            typed = to_schema(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{where}: {one_line(exc)}") from None
        settings = step_settings(typed)
        ids = {}
        for s in sources:
            revision = s.get("revision") or (typed.dataset.revision if len(sources) == 1 else None)
            ids[s["name"]] = steps[s["step"]].fingerprint if "step" in s else dataset_identity(s["name"], revision)
        if not sources:  # the step's own dataset settings
            for d in typed.dataset.sources or [typed.dataset]:
                ids[d.name] = dataset_identity(d.name, d.revision)
        fp = fingerprint(settings, ids)
        out_dir = root / "steps" / name / fp
        with open_dict(cfg):
            _set_input(cfg, sources, {s: str(steps[s].dir) for s in steps}, mixes)
            cfg.output.dir = str(out_dir)
        typed = to_schema(cfg)
        steps[name] = Step(
            name, step.stage, typed, cfg, [s["step"] for s in sources if "step" in s], fp, settings, ids, common
        )
    return list(steps.values())


def reapply(cfg: DictConfig, overrides: list[str]) -> None:
    """The command line's `key=value` overrides again, after the step's `set:`: as with any Hydra
    config file, the command line wins over the recipe file (`tokenize.seq_len=128` reaches the
    tokenize step even though the recipe sets it). Group choices were composed already."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from forge.compose import conf_dir

    groups = {p.name for p in Path(conf_dir()).iterdir() if p.is_dir()}
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if key in groups or key.split(".")[0] == "hydra" or o.is_delete():
            continue
        OmegaConf.update(cfg, key, o.value(), merge=True, force_add=o.is_add() or o.is_force_add())


def _open_free_maps(node: DictConfig) -> None:
    """Let `set:` add keys to free-form maps (score.pools, sbatch_extra, ...), as `+key=` would;
    keys of the typed groups stay checked (a typo is an error naming it)."""
    for key in list(node.keys()):
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            if child._metadata.object_type in (None, dict):
                OmegaConf.set_struct(child, False)
            else:
                _open_free_maps(child)


def _plain(value: Any) -> Any:
    """A step's `set:` as plain containers (it may arrive as a DictConfig or dataclass dict)."""
    if isinstance(value, (DictConfig,)):
        return OmegaConf.to_container(value, resolve=True)
    return copy.deepcopy(value)
