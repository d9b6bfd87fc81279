"""Who may write a run dir right now: flock()ed files under `<run dir>/state/`, held by every
process that writes into it, of every stage.

- `run.lock`: a local run (every shard in one process), and Slurm's finalize job (stats, card,
  tokenize's shards). Taken before the run dir is checked, so `output.on_change=fresh` can never
  move aside a dir another forge is writing.
- `task_TTTTT.lock`: one shard (a local run's task, a Slurm array task) of any stage.
- `step_<step>_TTTTT.lock`: one task of a step before the shards (dedup's signatures, buckets ...).

A second writer is refused at once with one line naming the holder (`pid N on HOST`). A lock
dies with its process (kill -9 included), so nothing stale is ever left to clean up.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from forge.run.output import OutputError

RUN_LOCK = "run.lock"
WRITER_LOCKS = (RUN_LOCK, "task_*.lock", "step_*.lock")
PROBE_TRIES, PROBE_WAIT_S = 10, 0.05  # a probe holds a lock for microseconds: 0.5 s is ample
log = logging.getLogger("forge.run.locks")


class RunBusy(OutputError):
    """Another forge process writes this run dir (or this shard of it) right now."""


def _holder(fh: Any) -> str:
    """`pid N on HOST`, as the holder wrote it into the lock file."""
    fh.seek(0)
    return fh.read().strip() or "another process"


def _flock(fh: Any, how: int) -> bool | None:
    """flock without waiting: True taken, False held by another, None when the file system has no
    locks (NFS mounted nolock, some FUSE mounts): then forge runs unlocked, as before locks."""
    try:
        fcntl.flock(fh, how | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise


@contextlib.contextmanager
def hold(path: Path, busy: str) -> Iterator[None]:
    """Hold the exclusive lock `path` for the block; `busy` (with `{holder}`) is the refusal. A
    lock held only for an instant (another forge probing it, `running_holder`) is waited out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        for _ in range(PROBE_TRIES):
            taken = _flock(fh, fcntl.LOCK_EX)
            if taken is not False:
                break
            time.sleep(PROBE_WAIT_S)
        else:
            raise RunBusy(busy.format(holder=_holder(fh)))
        if taken is None:
            log.warning("%s: this file system has no file locks; running without one", path)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}")
        fh.flush()
        try:
            yield
        finally:
            fh.truncate(0)


def shard_lock(out_dir: Path, task: int) -> contextlib.AbstractContextManager[None]:
    """One process per shard: a second forge (or a stale Slurm task) on the same shard would
    write duplicate rows, so it stops at once instead."""
    busy = f"shard {task} of {out_dir} is being run right now by {{holder}}; not starting it twice"
    return hold(out_dir / "state" / f"task_{task:05d}.lock", busy)


def step_lock(out_dir: Path, step: str, task: int) -> contextlib.AbstractContextManager[None]:
    """One process per task of a step before the shards (a Slurm step array's task)."""
    busy = f"step {step} task {task} of {out_dir} is being run right now by {{holder}}; not starting it twice"
    return hold(out_dir / "state" / f"step_{step}_{task:05d}.lock", busy)


def run_lock(out_dir: Path) -> contextlib.AbstractContextManager[None]:
    """The whole run dir: a local run, or the finalize job of a Slurm run."""
    busy = f"{out_dir} is being run right now by {{holder}}; not starting a second run in it"
    return hold(out_dir / "state" / RUN_LOCK, busy)


def running_holder(out_dir: Path, *patterns: str) -> str | None:
    """The holder of any writer's lock of the run dir (`pid N on HOST`), or None when nobody
    writes it (the Hub publisher's own lock is not a writer's)."""
    state = out_dir / "state"
    for path in sorted(p for pattern in patterns or WRITER_LOCKS for p in state.glob(pattern)):
        try:
            fh = open(path)
        except OSError:
            continue
        with fh:
            if _flock(fh, fcntl.LOCK_SH) is False:
                return _holder(fh)
    return None


def check_not_running(out_dir: Path) -> None:
    """Refuse, before anything is written, a run dir that another forge writes right now (any of
    its locks is held): its rows, config.yaml and card must keep describing that run."""
    holder = running_holder(out_dir)
    if holder is not None:
        raise RunBusy(f"{out_dir} is being run right now by {holder}; not starting a second run in it")


def check_run_free(out_dir: Path, task: int) -> None:
    """A Slurm task: refused while a local run (or a finalize job) holds the whole run dir."""
    holder = running_holder(out_dir, RUN_LOCK)
    if holder is not None:
        raise RunBusy(f"{out_dir} is being run right now by {holder}; not starting task {task} in it")
