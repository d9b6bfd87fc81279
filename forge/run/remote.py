"""A run dir on an object store (output.dir=s3://..., gs://..., hf://...): the run works in local
scratch (forge/storage/mirror.py pulls the remote dir down and pushes every committed file up),
under a remote lease that refuses a second writer on any machine (forge/storage/lease.py).

A resume from another machine (a laptop starts, a Slurm node finishes) pulls what the store holds
and goes on from there: nothing the store holds is redone, no answer in its cache is asked again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import xxhash

from forge.storage.fs import StorageError, check_url, configure, is_remote
from forge.storage.lease import Lease, live_holders
from forge.storage.mirror import Mirror

log = logging.getLogger("forge.run.remote")


def scratch_root(configured: str | None) -> Path:
    base = configured or os.environ.get("FORGE_SCRATCH") or "~/.cache/forge/scratch"
    return Path(base).expanduser()


def scratch_dir(url: str, configured: str | None, role: str) -> Path:
    """This machine's scratch for the remote run dir `url`, one per role (a local run, a Slurm
    task), stable across re-runs so a resume here downloads only what changed."""
    from forge.config import slug

    key = xxhash.xxh64_hexdigest(url.rstrip("/").encode())[:12]
    return scratch_root(configured) / f"{slug(url)}-{key}" / role


@contextlib.contextmanager
def remote_run_dir(cfg: Any, role: str, lease: str, others: tuple[str, ...] = ()) -> Iterator[Mirror]:
    """Hold the remote run dir's lease `lease` (refused while any lease in `others` is live, or
    any at all when `others` is empty), pull it into scratch and point cfg.output.dir there."""
    check_url(str(cfg.output.dir), "output.dir")
    url = str(cfg.output.dir).rstrip("/")
    configure(cfg.storage)
    busy = f"{url} is being run right now by {{holder}}; not starting a second run in it"
    held = live_holders(url, *others)
    if held:
        raise StorageBusy(busy.format(holder=held[0]))
    owner = Lease(url, lease, busy)
    owner.acquire()
    try:
        held = live_holders(url, *others, exclude=lease)  # one that started meanwhile
        if held:
            raise StorageBusy(busy.format(holder=held[0]))
        scratch = scratch_dir(url, cfg.storage.scratch_dir, role)
        mirror = Mirror(url, scratch)
        mirror.lease = owner
        t0 = time.monotonic()
        fetched = mirror.pull()
        if fetched:
            log.info(
                "%s: pulled %d file(s), %.1f MB, into %s in %.1f s",
                url,
                fetched,
                mirror.bytes_down / 1e6,
                scratch,
                time.monotonic() - t0,
            )
        cfg.output.dir = str(scratch)
        yield mirror
    finally:
        cfg.output.dir = url
        owner.release()


class StorageBusy(StorageError):
    """Another forge process writes this remote run dir right now."""


def run_remote(cfg: Any, role: str, lease: str, others: tuple[str, ...], work: Callable[[], int]) -> int:
    """work() (a run of forge/run/runner.py) on the remote run dir cfg.output.dir, through local
    scratch; the last push also after an error or Ctrl-C. Returns work's exit code, or 1 when the
    store refuses (one line naming the URL)."""
    url = str(cfg.output.dir)
    try:
        with remote_run_dir(cfg, role, lease, others) as mirror:
            mirror.start()
            code = 1
            try:
                code = work()
            finally:
                try:
                    mirror.close(final=True)
                except StorageError as exc:
                    if code == 0 or not mirror.failed:  # else already reported by the run
                        _say(str(exc), "what reached the store is whole; re-run the same command to resume")
                    code = code or 1
                except KeyboardInterrupt:
                    print(
                        "forge: interrupted during the last upload: what reached the store is whole; re-run "
                        "the same command to resume",
                        file=sys.stderr,
                    )
                    code = 130
            if code == 0:
                print(f"forge: run dir {url} ({mirror.bytes_up / 1e6:.1f} MB uploaded)", file=sys.stderr)
            return code
    except StorageError as exc:
        _say(str(exc), f"nothing in {url} changed")
        return 1


def _say(line: str, after: str) -> None:
    print(f"forge: error: {line}", file=sys.stderr)
    print(f"forge: {after}", file=sys.stderr)


__all__ = ["is_remote", "remote_run_dir", "run_remote", "scratch_dir"]
