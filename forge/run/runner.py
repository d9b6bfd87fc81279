"""The run lifecycle of every stage: accept-first checks, the run dir and its lock, logs, the
tasks, finish, publishing. It knows no stage: forge/stages/registry.py maps `pipeline.stage` to
the object it drives (prepare, start, run_task, finish; run_step for a workflow's steps)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from rich.logging import RichHandler

from forge.config import ForgeConfig
from forge.engine import EngineError
from forge.io.dataset import DatasetError
from forge.io.hub import (
    BackgroundPublisher,
    HubError,
    HubPublisher,
    preflight,
    publish_final,
    repo_url,
    target_from,
)
from forge.io.secrets import RedactingFilter, redact, register_config_secrets, register_secret_env
from forge.run.card_parts import record_command
from forge.run.locks import RunBusy, check_not_running, check_run_free, run_lock
from forge.run.output import (
    NamedWriteError,
    OutputError,
    RunChanged,
    check_output_dir,
    create_output_dir,
    mark_started,
)
from forge.run.progress import console
from forge.schema import ConfigError
from forge.stages.registry import DEFAULT_STAGE, load, spec, stage_run
from forge.storage.fs import StorageError, is_remote

log = logging.getLogger("forge")


class RunLogHandler(logging.FileHandler):
    """<run dir>/forge.log. A write that fails (disk full) is dropped silently: the failure that
    caused it is reported once, as one line, not as a logging traceback per record."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        pass


def setup_logging(out_dir: Path | None = None, log_name: str = "forge.log") -> None:
    """Rich lines on the terminal; with out_dir, also plain lines in <run dir>/forge.log (added
    only once the run is accepted, so a refused command writes nothing). Secrets masked in both."""
    root = logging.getLogger("forge")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    if sys.stderr.isatty():
        term: logging.Handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
        term.setFormatter(logging.Formatter("%(message)s"))
    else:  # Slurm logs, CI, pipes: unwrapped plain lines
        term = logging.StreamHandler(sys.stderr)
        term.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    term.addFilter(lambda record: not getattr(record, "file_only", False))
    term.addFilter(RedactingFilter())
    root.addHandler(term)
    root.propagate = False
    if out_dir is not None:
        attach_run_log(out_dir, log_name)


def attach_run_log(out_dir: Path, log_name: str = "forge.log") -> Path:
    path = out_dir / log_name
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = RunLogHandler(path)
    plain.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    plain.addFilter(RedactingFilter())
    logging.getLogger("forge").addHandler(plain)
    return path


def save_config(raw: DictConfig | dict, out_dir: Path) -> None:
    data = raw if isinstance(raw, dict) else OmegaConf.to_container(raw, resolve=True, enum_to_str=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(redact(data), sort_keys=False))


def prepare_run(cfg: ForgeConfig) -> Any:
    """The checks of any stage before a run is accepted (also before a Slurm submission)."""
    run = stage_run(cfg)
    run.prepare()
    return run


def _merge_quietly(out_dir: Path, run: Any) -> None:
    """stats.json also after a failure or Ctrl-C: what the shards hold so far."""
    if (out_dir / "stats").is_dir():
        try:
            run.partial_stats()
        except Exception as exc:  # never mask the error being reported
            log.warning("could not write stats.json: %s", exc)


def run_forge(
    cfg: ForgeConfig,
    raw: DictConfig | dict,
    log_name: str = "forge.log",
    merge: bool = True,
    overrides: list[str] | None = None,
) -> int:
    """Run the shards of cfg (all, or cluster.task_index) here; returns the exit code. A local
    run holds the run dir's lock (forge/run/locks.py) from before its checks to its last write.
    A run dir on an object store is worked on through local scratch (forge/run/remote.py)."""
    if is_remote(cfg.output.dir):
        from forge.run.remote import run_remote

        setup_logging()
        task = cfg.cluster.task_index
        role, lease, others = ("run", "run", ()) if task is None else (f"task-{task:05d}", f"task_{task:05d}", ("run",))
        return run_remote(cfg, role, lease, others, lambda: run_forge(cfg, raw, log_name, merge, overrides))
    with contextlib.ExitStack() as held:
        return _run_forge(cfg, raw, held, log_name, merge, overrides)


def _run_forge(
    cfg: ForgeConfig,
    raw: DictConfig | dict,
    held: contextlib.ExitStack,
    log_name: str = "forge.log",
    merge: bool = True,
    overrides: list[str] | None = None,
) -> int:
    """Run the shards of cfg (all, or cluster.task_index) here; returns the exit code.

    Nothing is written into the run dir until the run is accepted (output dir usable, input
    and template readable, settings match what the dir holds). A Slurm array task calls this
    for its own shard with its own log and merge=False: the finalize job merges stats once
    every shard is done. `overrides`, when given, are recorded in command.json (the card's
    reproducing command)."""
    out_dir = Path(cfg.output.dir)
    setup_logging()
    register_secret_env(cfg.model.api_key_env)
    if cfg.judge_model is not None:
        register_secret_env(cfg.judge_model.api_key_env)
    register_config_secrets(raw if isinstance(raw, dict) else OmegaConf.to_container(raw, resolve=True))
    register_config_secrets(dataclasses.asdict(cfg))  # a Slurm job's raw config holds env references
    t0 = time.monotonic()
    # a Slurm task (merge=False) never publishes: the monitor and finalize jobs do, once per run
    hub = target_from(cfg.output) if merge else None
    accepted = False
    try:
        check_output_dir(out_dir)
        local = cfg.cluster.task_index is None  # a Slurm task holds only its own shard's lock
        locked = False
        if local:
            check_not_running(out_dir)
            if (out_dir / "state").is_dir():  # else taken once accepted: a refused run creates nothing
                held.enter_context(run_lock(out_dir))
                locked = True
        else:
            check_run_free(out_dir, cfg.cluster.task_index)
        run = prepare_run(cfg)
        if hub:
            preflight(hub)  # a bad token fails here, before any engine starts
        create_output_dir(out_dir)
        if local and not locked:
            held.enter_context(run_lock(out_dir))
        accepted = True
        mark_started(out_dir)  # not a finished input for the next stage until this session finishes
        attach_run_log(out_dir, log_name)
        log.info("=== forge run %s in %s", time.strftime("%Y-%m-%d %H:%M:%S"), out_dir)
        if merge:
            save_config(raw, out_dir)
            if overrides is not None:
                record_command(out_dir, overrides)
        run.start()
        if cfg.run.plan:  # validated: only a generation run estimates
            return run.plan()
        tasks = [cfg.cluster.task_index] if cfg.cluster.task_index is not None else range(cfg.cluster.tasks)
        publishing = BackgroundPublisher(HubPublisher(out_dir, hub)) if hub else contextlib.nullcontext()
        try:
            with publishing:
                for task in tasks:
                    run.run_task(task)
        finally:
            if hasattr(run, "close"):
                run.close()  # a stage's engine (score) stops here, after its last task
    except (ConfigError, DatasetError, RunChanged, EngineError, OutputError, HubError, OSError) as exc:
        if merge and accepted:
            _merge_quietly(out_dir, run)
        message = _one_line(exc)
        log.error("%s", message, extra={"file_only": True})
        head, _, details = message.partition("\n")  # e.g. the engine log's last lines
        print(f"forge: error: {head}", file=sys.stderr)
        if accepted:
            print(f"forge: nothing finished was lost; log: {out_dir / log_name}", file=sys.stderr)
        else:
            print(f"forge: nothing finished was lost; nothing started, nothing in {out_dir} changed", file=sys.stderr)
        if details:
            print("\n".join(f"  | {line}" for line in details.splitlines()), file=sys.stderr)
        user_error = (ConfigError, DatasetError, RunChanged, HubError)
        if isinstance(exc, RunBusy):  # another forge runs it: re-run once that one has ended
            return 1
        return 2 if isinstance(exc, user_error) or (isinstance(exc, OutputError) and not accepted) else 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        if merge and accepted:
            _merge_quietly(out_dir, run)
        log.warning("interrupted", extra={"file_only": True})
        print("forge: interrupted: finished rows are saved; re-run the same command to resume", file=sys.stderr)
        return 130
    log.info("done in %.1f s", time.monotonic() - t0)
    if not merge:
        return 0
    try:
        _, summary = run.finish(hub.repo if hub else None)  # marks the dir finished (state/finished.json)
        if cfg.cluster.task_index is not None:  # one shard's finish does not make the dir whole
            mark_started(out_dir)
    except (OSError, OutputError) as exc:
        print(f"forge: error: {_one_line(exc)}", file=sys.stderr)
        print(f"forge: every row is in {out_dir / 'data'}; re-run the same command to write the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "forge: interrupted: every row is saved; re-run the same command to write stats and card", file=sys.stderr
        )
        return 130
    print(summary)
    if hub:
        try:
            publish_final(out_dir, hub)
        except HubError as exc:
            log.error("%s", exc, extra={"file_only": True})
            print(f"forge: error: {exc}", file=sys.stderr)
            return 1
        print(f"forge: published to {repo_url(hub.repo)}")
    return 0


def run_step(cfg: ForgeConfig, raw: DictConfig | dict, step: str, task: int, log_name: str) -> int:
    """One task of a step before the shards (a Slurm step array's task); returns the exit code."""
    out_dir = Path(cfg.output.dir)
    setup_logging()
    register_config_secrets(raw if isinstance(raw, dict) else OmegaConf.to_container(raw, resolve=True))
    try:
        check_run_free(out_dir, task)  # a local run of this dir holds run.lock: not beside it
        run = prepare_run(cfg)
        attach_run_log(out_dir, log_name)
        log.info("=== forge step %s, task %d, in %s", step, task, out_dir)
        run.run_step(step, task)
    except (ConfigError, DatasetError, RunChanged, OutputError, OSError, RuntimeError) as exc:
        log.error("%s", _one_line(exc), extra={"file_only": True})
        print(f"forge: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"forge: interrupted: step {step} task {task}; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


def _one_line(exc: BaseException) -> str:
    """An error as one line: forge's own messages as they are; an OSError with its path and
    cause (`cannot write /x/y: No space left on device`), and what to do."""
    if isinstance(exc, OSError) and not isinstance(exc, NamedWriteError | StorageError):
        what = f"{exc.filename}: " if exc.filename else ""
        full = exc.errno == errno.ENOSPC
        hint = "free some space and re-run the same command to resume" if full else "re-run the same command to resume"
        text = f"{what}{exc.strerror or exc}; {hint}"
    else:
        text = str(exc)
        if isinstance(exc, StorageError):
            text += "; what reached the store is whole: re-run the same command to resume"
        if isinstance(exc, NamedWriteError) and "No space left" in text:
            text += "; free some space and re-run the same command to resume"
    return text


def finish_run_dir(out_dir: Path, hub_repo: str | None) -> dict[str, Any]:
    """stats.json and the card of a finished run dir of any stage (Slurm's finalize job)."""
    saved = yaml.safe_load((out_dir / "config.yaml").read_text()) if (out_dir / "config.yaml").exists() else {}
    stage = ((saved or {}).get("pipeline") or {}).get("stage", DEFAULT_STAGE)
    s = spec(stage)
    return load(s.run).finish_dir(out_dir, hub_repo)
