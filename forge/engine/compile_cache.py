"""A shared torch.compile / CUDA-graph cache for vLLM, locked while an engine starts so that
concurrent tasks on one node neither compile twice into it nor read a half-written entry."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from forge.engine.tiny_model import default_cache_dir

log = logging.getLogger("forge.engine")


def cache_dir(configured: str | None) -> Path:
    return Path(configured).expanduser() if configured else default_cache_dir() / "vllm"


def entries(path: Path) -> set[str]:
    """The compiled graphs in the cache: one directory per model/config hash."""
    compiled = path / "torch_compile_cache"
    return {p.name for p in compiled.iterdir()} if compiled.is_dir() else set()


def is_warm(path: Path) -> bool:
    compiled = path / "torch_compile_cache"
    return compiled.is_dir() and any(compiled.iterdir())


@contextmanager
def locked(path: Path) -> Iterator[bool]:
    """Hold the cache's lock for the block; yields whether the cache was warm."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".forge-compile.lock", "w") as lock:
        t0 = time.monotonic()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another task to finish compiling into %s", path)
            fcntl.flock(lock, fcntl.LOCK_EX)
            log.info("compile-cache lock acquired after %.0f s", time.monotonic() - t0)
        os.environ["VLLM_CACHE_ROOT"] = str(path)
        yield is_warm(path)
