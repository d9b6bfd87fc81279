"""What a recipe dir remembers: per step, one record per output it has made
(`steps/STEP/FINGERPRINT.json`: settings, inputs, counts, times), the current output of each step
(`state.json`, and a link `STEP` -> `steps/STEP/FINGERPRINT`), and the lineage of the whole chain
(`lineage.json`, also written into each step's run dir before it runs, so its card shows the chain)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from forge.run.output import write_json_atomic

STATE = "state.json"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class Records:
    """The records of one recipe dir."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, step: str, fp: str) -> Path:
        return self.root / "steps" / step / f"{fp}.json"

    def get(self, step: str, fp: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.path(step, fp).read_text())
        except (OSError, ValueError):
            return None

    def put(self, step: str, fp: str, record: dict[str, Any]) -> None:
        write_json_atomic(self.path(step, fp), record)

    def state(self) -> dict[str, Any]:
        try:
            return json.loads((self.root / STATE).read_text())
        except (OSError, ValueError):
            return {}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """state.json is read, changed and written by one command at a time."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".state.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def plan(self, recipe: str, fingerprints: dict[str, str]) -> None:
        """What the last command planned: the step order and each step's fingerprint (forge-status)."""
        state = self.state()
        new = {**state, "recipe": recipe, "order": list(fingerprints), "planned": fingerprints}
        if new == state:
            return
        with self._locked():
            state = self.state()
            write_json_atomic(
                self.root / STATE, {**state, "recipe": recipe, "order": list(fingerprints), "planned": fingerprints}
            )

    def current(self, step: str) -> str | None:
        return (self.state().get("current") or {}).get(step)

    def all_of(self, step: str) -> list[dict[str, Any]]:
        """Every record of a step, the most recently used first."""
        folder = self.root / "steps" / step
        found = []
        for p in folder.glob("*.json") if folder.is_dir() else []:
            try:
                found.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                continue
        return sorted(found, key=lambda r: r.get("used_at") or r.get("created_at") or "", reverse=True)

    def make_current(self, step: str, fp: str) -> None:
        """The step's current output is `fp`: state.json, its record's used_at, the link."""
        if (self.state().get("current") or {}).get(step) != fp:
            with self._locked():
                state = self.state()
                state.setdefault("current", {})[step] = fp
                write_json_atomic(self.root / STATE, state)
            record = self.get(step, fp)
            if record is not None:
                record["used_at"] = now()
                self.put(step, fp, record)
        link = self.root / step
        target = Path("steps") / step / fp
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
        tmp = self.root / f".{step}.link"
        tmp.unlink(missing_ok=True)
        try:
            tmp.symlink_to(target, target_is_directory=True)
            os.replace(tmp, link)
        except OSError:  # a file system without links: state.json alone says which is current
            tmp.unlink(missing_ok=True)

    def collect(self, steps: list[str], keep: int) -> list[Path]:
        """Remove each step's outputs beyond the current one and the `keep` most recently used,
        never one that a forge process or a Slurm job is writing. The record goes first and the
        dir is renamed before it is deleted, so a kill midway never leaves a half-removed output
        that a later command would take for a finished one."""
        from forge.cluster.state import live_job_ids
        from forge.run.locks import running_holder

        removed = []
        for step in steps:
            current = self.current(step)
            others = [r for r in self.all_of(step) if r.get("fingerprint") != current]
            for r in others[keep:]:
                fp = r["fingerprint"]
                out = self.root / "steps" / step / fp
                if out.is_dir() and (running_holder(out) or live_job_ids(out)):
                    continue
                self.path(step, fp).unlink(missing_ok=True)
                if out.is_dir():
                    trash = out.with_name(f".removed-{fp}-{os.getpid()}")
                    os.replace(out, trash)
                    shutil.rmtree(trash, ignore_errors=True)
                removed.append(out)
        return removed


def counts_of(out_dir: Path) -> dict[str, Any]:
    """Rows in / kept / rejected (by reason) from a finished run dir's stats.json."""
    try:
        stats = json.loads((out_dir / "stats.json").read_text())
    except (OSError, ValueError):
        return {}
    if "rows_in" in stats:  # a batch stage
        return {
            "in": stats.get("rows_in", 0),
            "kept": stats.get("rows_kept", 0),
            "rejected": stats.get("rows_removed", 0),
            "rejected_by": stats.get("removed_by_filter") or {},
        }
    return {
        "in": stats.get("documents_in", 0),
        "kept": stats.get("rows_written", 0),
        "rejected": stats.get("rejected_rows", 0),
        "rejected_by": stats.get("rejected_by_stage") or {},
    }
