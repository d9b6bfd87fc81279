"""Composing forge's config outside of Hydra's own entry point: conf/ located, a composition
error reduced to one line naming the key, the typed and validated config. Used by the `forge`
command (forge/cli.py) and by a recipe, which composes one config per step (forge/recipe/)."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from forge.config import ForgeConfig, register_configs, validate


def conf_dir() -> str:
    """conf/ beside the package (editable install), or $FORGE_CONF_DIR."""
    env = os.environ.get("FORGE_CONF_DIR")
    if env:
        return str(Path(env).resolve())
    return str(Path(__file__).resolve().parent.parent / "conf")


def to_schema(cfg: DictConfig) -> ForgeConfig:
    """Resolve and convert to the typed dataclass tree (raises ConfigError on bad values)."""
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, ForgeConfig)
    validate(obj)
    return obj


def _fields_of(path: str) -> list[str]:
    node: type = ForgeConfig
    for part in path.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields or not dataclasses.is_dataclass(fields[part].default_factory):
            return []
        node = fields[part].default_factory
    return [f.name for f in dataclasses.fields(node)]


def one_line(exc: BaseException) -> str:
    """The gist of a Hydra/OmegaConf composition error, naming the key, on one line."""
    e: BaseException | None = exc
    while e is not None:
        key = getattr(e, "full_key", None)
        if isinstance(e, OmegaConfBaseException) and key:
            msg = str(e).splitlines()[0]
            close = difflib.get_close_matches(key.split(".")[-1], _fields_of(key), n=1)
            hint = ""
            if close and "not in" in msg:
                near = f"{key.rsplit('.', 1)[0]}.{close[0]}" if "." in key else close[0]
                hint = f" (did you mean {near}?)"
            return f"{key}: {msg}{hint}"
        e = e.__cause__ or e.__context__
    text = str(exc)
    missing = re.search(
        r"Could not find '([^'/]+)/([^']+)'.*?Available options in '[^']+':(.*?)(Config search|$)", text, re.S
    )
    if missing:
        group, name, options = missing.group(1), missing.group(2), missing.group(3).split()
        return f"{group}={name}: no such {group} config; choose one of: {', '.join(options)}"
    return " ".join(text.replace("Set the environment variable HYDRA_FULL_ERROR=1", "").split())


def compose(overrides: list[str]) -> DictConfig:
    """forge's config composed with these overrides (in the running Hydra app, or a new context),
    without Hydra's own node."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    if GlobalHydra.instance().is_initialized():
        cfg = hydra_compose(config_name="config", overrides=overrides)
    else:
        register_configs()
        with initialize_config_dir(version_base="1.3", config_dir=conf_dir()):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg
