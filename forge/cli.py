"""The `forge` command: compose the config with Hydra, validate it, run the pipeline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from forge.config import ConfigError, ForgeConfig, register_configs, validate


def conf_dir() -> str:
    """conf/ beside the package (editable install) or $FORGE_CONF_DIR."""
    env = os.environ.get("FORGE_CONF_DIR")
    if env:
        return str(Path(env).resolve())
    return str((Path(__file__).resolve().parent.parent / "conf"))


def to_schema(cfg: DictConfig) -> ForgeConfig:
    """Resolve and convert to the typed dataclass tree (raises ConfigError on bad values)."""
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, ForgeConfig)
    validate(obj)
    return obj


def _task(cfg: DictConfig) -> None:
    from forge.runner import run_forge

    try:
        typed = to_schema(cfg)
    except ConfigError as exc:
        print(f"forge: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(run_forge(typed, cfg))


def main() -> None:
    register_configs()
    hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")(_task)()


if __name__ == "__main__":
    main()
