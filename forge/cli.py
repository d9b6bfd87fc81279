"""The `forge` command: compose the config with Hydra, validate it, run the pipeline.

Config mistakes end in one line that names the key (`forge: error: model.tpp: ...`, exit code
2, as README's "A failure is one line" says): the overrides are parsed one by one and composed
once up front (a sweep: once per swept value), before Hydra's own multi-line report could appear.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from forge.compose import conf_dir, one_line, to_schema
from forge.config import ForgeConfig, register_configs
from forge.schema import ConfigError
from forge.storage.fs import is_remote

# values that are expressions, never Hydra syntax: `+curate.pools.x='meta_correctness >= 0.8'` reaches
# us without the shell's quotes, and `>=` or spaces are not valid in an unquoted Hydra value
EXPRESSION_OVERRIDE = re.compile(r"^(\+{0,2}(?:[A-Za-z0-9_.]+\.)?pools\.[A-Za-z0-9_.-]+)=(.*)$", re.S)


def quote_expressions(arg: str) -> str:
    """Quote the value of a pool-expression override for Hydra (unless it is quoted already)."""
    m = EXPRESSION_OVERRIDE.match(arg)
    if not m:
        return arg
    key, value = m.groups()
    if len(value) >= 2 and value[0] in "'\"" and value[-1] == value[0]:
        return arg
    return key + '="' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


MULTIRUN_FLAGS = ("--multirun", "-m")
MAX_SWEEP_CHECKS = 16  # compositions a sweep is checked with, at most (~0.1 s each); Hydra checks the rest


def _parse(argv: list[str]) -> tuple[list, str | None]:
    """The overrides, parsed one by one so that a malformed one is named: ([...], None) or ([], line)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = []
    for arg in argv:
        key = arg.split("=", 1)[0].strip()
        try:
            override = parser.parse_override(arg)
        except Exception as exc:  # a malformed override
            why = " ".join(str(exc).split("See https://")[0].split())
            return [], f"{key or arg}: cannot parse {arg!r}: {why} (write key=value)"
        if not override.key_or_group:
            return [], f"{arg}: an override needs a key (write key=value)"
        parsed.append(override)
    return parsed, None


def _compose(*points: list[str]) -> DictConfig:
    """Compose the config with each list of overrides (one Hydra context); returns the first."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=conf_dir()):
        composed = [compose(config_name="config", overrides=p, return_hydra_config=True) for p in points]
    return composed[0]


def _first(override) -> str:
    """The override, a sweep replaced by its first value."""
    if not override.is_sweep_override():
        return override.input_line
    return f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"


def _sweep_points(parsed: list, params: dict) -> list[list[str]]:
    """Overrides that give each value of each swept key once, the others at their first value:
    the command line's sweeps and the grid of a `+sweep=...` config (hydra.sweeper.params).
    Raises on a sweep only Hydra's sweeper can enumerate (glob, interval) or read."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    given = {o.key_or_group for o in parsed}  # the command line wins over the grid, as in Hydra
    grid = [*parsed, *(parser.parse_override(f"{k}={v}") for k, v in params.items() if k.lstrip("+~") not in given)]
    first = [_first(o) for o in grid]
    points = [first]
    for i, o in enumerate(grid):
        if o.is_sweep_override():
            for value in list(o.sweep_string_iterator())[1:]:
                points.append([*first[:i], f"{o.get_key_element()}={value}", *first[i + 1 :]])
    return points[:MAX_SWEEP_CHECKS]


def precheck(argv: list[str]) -> str | None:
    """Compose `forge key=value ...` once, or each value of a sweep; return the error line
    (`<key>: ...`), if any. A plain command is also validated. A sweep is only composed: each
    point is validated when it runs, and a point that does not validate is one failed point."""
    from hydra.types import RunMode

    flags = [a for a in argv if a.startswith("-")]
    if any(a not in MULTIRUN_FLAGS for a in flags):
        return None  # --cfg, --help, ...: Hydra handles these itself
    parsed, error = _parse([a for a in argv if not a.startswith("-")])
    if error:
        return error
    try:
        first = [_first(o) for o in parsed]
    except Exception:  # a sweep only Hydra's sweeper enumerates (glob, interval): Hydra checks it
        return None
    swept = [o for o in parsed if o.is_sweep_override()]
    try:
        cfg = _compose(first)
        with open_dict(cfg):  # what the task gets: the config without Hydra's own node
            hydra_cfg = cfg.pop("hydra")
        if not (flags or hydra_cfg.mode == RunMode.MULTIRUN):
            if swept:
                o = swept[0]
                return (
                    f"{o.key_or_group}: {o.input_line!r} sweeps over values: add --multirun to run each, "
                    f"or write {o.get_key_element()}=[...] for a list or quote the value for a string"
                )
            to_schema(cfg)
            return None
    except ConfigError as exc:
        return str(exc)
    except Exception as exc:
        return one_line(exc)
    params = hydra_cfg.sweeper.get("params") or {}
    try:
        points = _sweep_points(parsed, OmegaConf.to_container(params) if params else {})
    except Exception:  # as above, or a grid Hydra reports itself
        return None
    try:
        _compose(*points)
    except Exception as exc:
        return one_line(exc)
    return None


def swept_keys(argv: list[str], sweeper_params: dict | None) -> set[str]:
    """Keys a multirun varies: sweep syntax on the command line (`a=1,2`, `range(...)`) and the
    grid of a `+sweep=...` config (hydra.sweeper.params)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = {str(k).lstrip("+~") for k in (sweeper_params or {})}
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    except Exception:  # Hydra already accepted them; never fail a run on naming
        return keys
    return keys | {o.key_or_group for o in parsed if o.is_sweep_override()}


def sweep_point_dir(base: str, overrides: list[str], keys: set[str]) -> str:
    """A sweep point's own run dir: <output.dir>/<key=value of each swept key>, stable across re-runs."""
    parts = []
    for item in sorted(overrides):
        key = item.split("=", 1)[0].lstrip("+~")
        if key in keys and key != "output.dir":
            parts.append(re.sub(r"[^A-Za-z0-9._=,-]+", "_", item.lstrip("+~")))
    name = ",".join(parts) or "default"
    if len(name) > 200:  # file names stop at 255 bytes
        name = f"{name[:180]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return str(Path(base) / name)


def _given(argv: list[str], key: str) -> bool:
    """Whether the command line sets `key` (`key=...`, `+key=...`, `++key=...`, swept or not)."""
    return any(not a.startswith(("-", "~")) and "=" in a and a.split("=", 1)[0].lstrip("+") == key for a in argv)


def sweep_base_dir(argv: list[str], output_dir: str, sweep_dir: str) -> tuple[str, str | None]:
    """Where a multirun's points go (each in `<base>/<point name>`), and a note to print, if any.

    output.dir names the base; `hydra.sweep.dir=X` on the command line moves it to X, unless
    output.dir is on the command line too: then output.dir wins and the note says X is ignored.
    """
    if not _given(argv, "hydra.sweep.dir"):
        return output_dir, None
    if _given(argv, "output.dir"):
        return output_dir, (
            f"forge: hydra.sweep.dir={sweep_dir} is ignored: output.dir={output_dir} names where the sweep points go"
        )
    return sweep_dir, None


_noted: list[str] = []  # the sweep-dir note, printed once: Hydra runs every point in this process


def _launch(typed: ForgeConfig, cfg: DictConfig, overrides: list[str]) -> int:
    """Run the shards here, or submit them to Slurm; returns the exit code. The overrides go
    into command.json once the run is accepted (a refused command writes nothing)."""
    from forge.config import Backend

    if typed.recipe.name is not None:
        from forge.recipe.run import run_recipe

        return run_recipe(typed, cfg, overrides)
    if typed.cluster.backend == Backend.slurm:
        from forge.cluster.slurm import submit

        return submit(typed, cfg, overrides)
    from forge.run.runner import run_forge

    return run_forge(typed, cfg, overrides=overrides)


def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from forge.sweep import points as sweep

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun:  # every point gets its own run dir, or points would mix
        params = hc.sweeper.get("params")
        keys = swept_keys(sys.argv[1:], OmegaConf.to_container(params) if params is not None else None)
        base, note = sweep_base_dir(sys.argv[1:], cfg.output.dir, str(hc.sweep.dir))
        if is_remote(base):  # points' outcomes and Hydra's multirun.yaml are local files
            print(f"forge: error: output.dir: a sweep's points go to a local dir, not {base}", file=sys.stderr)
            sys.exit(2)
        if note and not _noted:
            _noted.append(note)
            print(note, file=sys.stderr)
        cfg.output.dir = sweep_point_dir(base, list(hc.overrides.task), keys)
    try:
        typed = to_schema(cfg)
    except ConfigError as exc:
        print(f"forge: error: {exc}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        sweep.config_failed(Path(cfg.output.dir), list(hc.overrides.task), str(exc))
        return
    if multirun:  # skips settled points; one point's failure never ends the sweep (forge/sweep/points.py)
        overrides = list(hc.overrides.task)
        sweep.run_point(typed, overrides, lambda: _launch(typed, cfg, overrides))
        return
    code = _launch(typed, cfg, list(hc.overrides.task))
    if code:
        sys.exit(code)


def main() -> None:
    from forge.io.secrets import guard_std_streams, register_override_secrets

    # before anything can print: secret values on the command line are masked in every stream
    register_override_secrets(sys.argv[1:])
    guard_std_streams()
    sys.argv[1:] = [quote_expressions(a) for a in sys.argv[1:]]
    register_configs()
    error = precheck(sys.argv[1:])
    if error:
        print(f"forge: error: {error}", file=sys.stderr)
        sys.exit(2)
    from forge.sweep import points as sweep

    try:
        hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")(_task)()
    finally:
        code = sweep.report()  # a multirun's failures, listed once every point ran
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
