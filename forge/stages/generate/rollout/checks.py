"""Loading and checking a rollout before anything runs: the function and its setup are imported
(from the working dir first), must be what forge will call, and each bad key is one line."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from forge.config import ForgeConfig
from forge.run.output import renamed_module
from forge.schema import ConfigError
from forge.stages.generate.rollout.columns import parse_declared
from forge.stages.generate.rollout.config import CHAT_FN, RolloutConfig
from forge.stages.generate.rollout.structured import load_schema

log = logging.getLogger("forge.stages.generate.rollout")
KNOBS = ("rounds", "turns", "n", "score_min", "score_max", "answer_column", "parse_retries")


def load_ref(key: str, ref: str) -> Any:
    """`module:function` -> the function; one line naming the key when it cannot be loaded."""
    module, sep, name = renamed_module(ref).partition(":")  # a config written before forge/stages/
    if not sep or not module or not name:
        raise ConfigError(f"{key}: {ref!r} is not `module:function` (e.g. my_pkg.rollouts:translate_and_check)")
    if os.getcwd() not in sys.path:  # "importable from the working dir"
        sys.path.insert(0, os.getcwd())
    try:
        mod = _import_file(module) if module.endswith(".py") else importlib.import_module(module)
    except Exception as exc:  # the user's module: any error on import is theirs to see
        raise ConfigError(f"{key}: cannot import {module} ({type(exc).__name__}: {exc})") from None
    if not hasattr(mod, name):
        public = [n for n, v in vars(mod).items() if callable(v) and not n.startswith("_")]
        raise ConfigError(f"{key}: {module} has no {name!r} (its functions: {', '.join(public[:12]) or 'none'})")
    return getattr(mod, name)


def _import_file(path: str) -> Any:
    """`rollout.fn=path/to/rollouts.py:fn`: a file, imported under its own name (also by the
    process pool's workers, which find it on sys.path)."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if str(file.parent) not in sys.path:
        sys.path.insert(0, str(file.parent))
    return importlib.import_module(file.stem)


def rollout_fn(r: RolloutConfig) -> Any:
    fn = load_ref("rollout.fn", r.fn)
    if not inspect.iscoroutinefunction(fn):
        raise ConfigError(f"rollout.fn: {r.fn} must be `async def fn(row, generate, ctx)`")
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
    if len(params) < 3 and not any(p.kind == p.VAR_POSITIONAL for p in params):
        raise ConfigError(f"rollout.fn: {r.fn} takes {len(params)} arguments; forge calls fn(row, generate, ctx)")
    return fn


def setup_fn(r: RolloutConfig) -> Any:
    if r.setup:
        fn = load_ref("rollout.setup", r.setup)
    else:
        module = r.fn.partition(":")[0]
        name = Path(module).stem if module.endswith(".py") else module
        fn = getattr(sys.modules[name], "setup", None)
    if fn is not None and not callable(fn):
        raise ConfigError(f"rollout.setup: {r.setup or r.fn.partition(':')[0] + ':setup'} is not callable")
    return fn


def uses_rollout_path(cfg: ForgeConfig) -> bool:
    """Today's one-request-per-sample path serves the default chat rollout without a schema."""
    return cfg.rollout.fn != CHAT_FN or cfg.generation.json_schema is not None


def validate_rollout(cfg: ForgeConfig) -> None:
    r = cfg.rollout
    fn = rollout_fn(r)
    setup_fn(r)
    parse_declared(r.columns)
    load_schema(cfg.generation.json_schema)
    for key in ("rounds", "turns", "n", "parse_retries"):
        if getattr(r, key) < (0 if key == "parse_retries" else 1):
            raise ConfigError(f"rollout.{key}: must be >= {0 if key == 'parse_retries' else 1} (got {getattr(r, key)})")
    if r.score_min >= r.score_max:
        raise ConfigError(f"rollout.score_min: must be below rollout.score_max ({r.score_min} >= {r.score_max})")
    if r.max_active is not None and r.max_active < 1:
        raise ConfigError(f"rollout.max_active: must be >= 1 (got {r.max_active})")
    if r.timeout_s is not None and not r.timeout_s > 0:
        raise ConfigError(f"rollout.timeout_s: must be > 0 seconds, or null for no limit (got {r.timeout_s})")
    if r.timeout_s is not None and not uses_rollout_path(cfg):
        log.warning("rollout.timeout_s has no effect with the default chat rollout: run.request_timeout_s bounds it")
    uses = getattr(fn, "uses", None)
    if uses is not None:  # a ready rollout says which knobs it reads: warn about the others
        defaults = {f.name: f.default for f in fields(RolloutConfig)}
        idle = [k for k in KNOBS if k not in uses and getattr(r, k) != defaults[k]]
        if idle:
            log.warning("rollout.%s has no effect with rollout.fn=%s", ", rollout.".join(idle), r.fn)
        for name in getattr(fn, "prompts", ()):
            if name not in r.prompts:
                raise ConfigError(f"rollout.prompts.{name}: {r.fn} needs this prompt; set it in conf/rollout/")
    if "n" in (uses or ()) and cfg.generation.temperature == 0:
        log.warning("rollout.n: generation.temperature=0 makes the %d samples identical", r.n)
    if cfg.judge_model is not None and not uses_rollout_path(cfg):
        log.warning("judge_model is set, but rollout=chat never calls it; pick rollout=judge or best_of_n")
