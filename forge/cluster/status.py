"""`forge-status RUN_DIR`: where a run stands: per shard its Slurm job and state, rows done, and for
a failed shard the error and the log to read; then the monitor and finalize jobs."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from forge.cluster.state import SlurmError, job_states, load_history, shard_reports
from forge.run.progress import aggregate_progress
from forge.storage.fs import StorageError, is_remote

BULK = ("data/", "rejected/", "pools/", "tokens/", "cache/", "steps/", ".stale/")


def pull_for_status(url: str) -> Path:
    """The small files of a remote run dir (state, progress, stats, manifest), in this machine's
    scratch; says who writes it right now."""
    from forge.run.remote import scratch_dir
    from forge.storage.config import StorageConfig
    from forge.storage.fs import configure
    from forge.storage.lease import live_holders
    from forge.storage.mirror import Mirror

    configure(StorageConfig())
    local = scratch_dir(url, None, "status")
    Mirror(url, local).pull(include=lambda rel: not rel.startswith(BULK))
    holders = live_holders(url)
    print(f"{url}: " + (f"being written right now by {', '.join(holders)}" if holders else "nobody writes it now"))
    return local


def tasks_of(out: Path) -> int:
    manifest = json.loads((out / "forge_run.json").read_text())
    return int(manifest["sharding"]["tasks"])


def print_batches_and_spend(out: Path, progress: dict) -> None:
    """A batch engine's open batches (model=openai_batch) and what the run has spent so far."""
    now = time.time()
    for path in sorted(out.glob("state/batches_*/batches.json")):
        try:
            batches = json.loads(path.read_text()).get("batches", {})
        except (OSError, ValueError):
            continue  # being replaced right now
        for batch_id, b in batches.items():
            age = (now - b.get("submitted", now)) / 60
            print(f"  batch {batch_id:<30} {b.get('status', '?'):<12} {len(b.get('ids', []))} requests, "
                  f"submitted {age:,.0f} min ago ({path.parent.name})")  # fmt: skip
    spent = progress.get("running_cost_usd") or 0.0
    for path in sorted(out.glob("stats/task_*.json")):
        try:
            spent += sum(s.get("cost_usd") or 0.0 for s in json.loads(path.read_text()).get("sessions", []))
        except (OSError, ValueError):
            continue
    if spent:
        print(f"  spent so far: ${spent:,.4f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="forge-status", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a run dir, local or on an object store (s3://, gs://, hf://...)")
    args = ap.parse_args(argv)
    shown = args.run_dir
    if is_remote(args.run_dir):
        try:
            out = pull_for_status(args.run_dir)
        except StorageError as exc:
            print(f"forge-status: {exc}", file=sys.stderr)
            return 1
    else:
        out = Path(args.run_dir).resolve()
        shown = str(out)
    from forge.recipe.status import is_recipe_dir, print_status

    if is_recipe_dir(out):  # a recipe dir: one line per step
        return print_status(out)
    if not (out / "forge_run.json").exists():
        print(f"forge-status: {out} is not a forge run dir (no forge_run.json)", file=sys.stderr)
        return 2
    tasks = tasks_of(out)
    progress = aggregate_progress(out)
    per_task = progress["tasks"]
    try:
        reports = shard_reports(out, tasks)
        history = load_history(out)
        last = history[-1] if history else None
        side = job_states([j for j in (last.monitor_id, last.finalize_id) if j]) if last else {}
    except SlurmError as exc:
        print(f"forge-status: {exc}", file=sys.stderr)
        return 1
    pct = f" ({progress['percent']}%)" if progress["percent"] is not None else ""
    reporting = progress["tasks_reporting"]
    print(f"{shown}: {progress['done']}/{progress['total']} docs{pct} reported by {reporting} shard(s)")
    for r in reports:
        p = per_task.get(str(r.shard), {})
        rows = f"{p.get('done', '?')}/{p.get('total', '?')}"
        state = "complete" if r.complete else r.state
        print(f"  shard {r.shard:>4}  job {r.job or '-':<12} {state:<14} {rows:>12} docs")
        if r.error or (not r.complete and r.log and state not in ("RUNNING", "PENDING")):
            print(f"              error: {r.error or 'see log'}\n              log:   {r.log}")
    if last:
        for name, jid in (("monitor", last.monitor_id), ("finalize", last.finalize_id)):
            if jid:
                print(f"  {name:<8} job {jid:<12} {side.get(jid, 'UNKNOWN')}")
    print_batches_and_spend(out, progress)
    complete = sum(r.complete for r in reports)
    stats = f"; stats: {shown.rstrip('/')}/stats.json" if complete == tasks else ""
    print(f"{complete}/{tasks} shard(s) complete{stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
