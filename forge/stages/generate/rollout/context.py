"""`ctx`, the per-task context a rollout function shares with every row: built once, torn down
at the end of the task. It holds the rollout's knobs and prompts, a temp dir, a process pool
for CPU work (started on first use), and whatever the user's `setup(ctx)` returned."""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing
import os
import re
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from forge.config import ForgeConfig
from forge.stages.generate.prompt import LengthFitter, build
from forge.stages.generate.rollout.config import RolloutConfig

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Context:
    """Attributes: cfg (the `rollout:` group), options, prompts, generation (the default sampling),
    tmp_dir, state (setup's result), has_judge (a judge_model is configured)."""

    def __init__(self, cfg: ForgeConfig, template: str | None, fitter: LengthFitter | None) -> None:
        self.cfg: RolloutConfig = cfg.rollout
        self.options: dict[str, Any] = dict(cfg.rollout.options)
        self.prompts: dict[str, str] = dict(cfg.rollout.prompts)
        self.has_judge = cfg.judge_model is not None
        self.generation = cfg.generation
        self.state: Any = None
        self._forge = cfg
        self._template = template
        self._fitter = fitter
        self._tmp: Path | None = None
        self._pool: ProcessPoolExecutor | None = None

    @property
    def tmp_dir(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="forge-rollout-"))
        return self._tmp

    @property
    def pool(self) -> ProcessPoolExecutor:
        """A process pool for CPU work (running code, parsing): `await ctx.run(fn, *args)`."""
        if self._pool is None:
            # forkserver: forking this process (engine client and sqlite threads) is not safe
            ctx = multiprocessing.get_context("forkserver")
            self._pool = ProcessPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1), mp_context=ctx)
        return self._pool

    async def run(self, fn: Any, *args: Any) -> Any:
        """fn(*args) in the process pool (fn must be importable: a module-level function)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def messages(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The row's prompt as the `prompt:` group builds it (template, system prompt, length fit).
        A row whose prompt cannot be built raises forge.stages.generate.prompt.RowRejected (quarantined as `prompt`)."""
        from forge.stages.generate.rollout.driver import CURRENT

        built = build(row.get(self._forge.dataset.prompt_column), self._forge.prompt, self._template)
        if self._fitter is not None:
            built, truncated = self._fitter.fit(built)
            rollout = CURRENT.get()
            if truncated and rollout is not None:
                rollout.truncated = True
        return built.as_dicts()

    def render(self, name: str, **fields: Any) -> str:
        """rollout.prompts.<name> with each `{field}` filled in (other braces are left as they are)."""
        if name not in self.prompts:
            raise KeyError(f"rollout.prompts.{name} is not set (prompts: {', '.join(self.prompts) or 'none'})")
        return PLACEHOLDER.sub(
            lambda m: str(fields[m.group(1)]) if m.group(1) in fields else m.group(0), self.prompts[name]
        )

    async def setup(self, fn: Any) -> None:
        if fn is None:
            return
        result = fn(self)
        self.state = await result if inspect.isawaitable(result) else result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
