"""The three kinds of Slurm job of a run, as submitit callables (pickled at submission, run on
the nodes):

- ShardJob: one array task = one input shard, run by the same code as a local run. Checkpointable:
  on USR2 (time limit or preemption) submitit requeues it, and the requeued task resumes from the
  shard's Parquet chunks and request cache. It raises when the shard did not finish, so the task
  ends FAILED and `afterok` dependents never run.
- MonitorJob: follows the array while it runs, refreshing <run dir>/progress.json and logging a
  progress line; it ends when the array ends, whatever its fate.
- FinalizeJob (afterok on the array): merges per-shard stats into stats.json and writes the run's
  final summary once every shard is complete.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import submitit
from omegaconf import OmegaConf

from forge.cluster.state import ACTIVE, SlurmError, job_states, live_states, shard_complete
from forge.config import ForgeConfig, register_configs, validate
from forge.io.hub import HubPublisher, publish_final, publish_progress
from forge.run.locks import run_lock
from forge.run.output import write_json_atomic
from forge.run.progress import aggregate_progress

log = logging.getLogger("forge.cluster")


class ShardFailed(RuntimeError):
    """A shard's task ended without finishing its rows; the message names the shard and log."""


def job_config(job_cfg: dict[str, Any], shard: int) -> ForgeConfig:
    """The submitted config, typed and validated again, pinned to one shard."""
    register_configs()
    merged = OmegaConf.merge(OmegaConf.structured(ForgeConfig), job_cfg)
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, ForgeConfig)
    cfg.cluster.task_index = None
    validate(cfg)
    cfg.cluster.task_index = shard
    return cfg


def task_log(out_dir: str | Path, shard: int) -> Path:
    return Path(out_dir) / "logs" / f"forge_task{shard:05d}.log"


class ShardJob(submitit.helpers.Checkpointable):
    """One array task. checkpoint() (inherited) resubmits the same call: all state is on disk."""

    def __call__(self, job_cfg: dict[str, Any], shard: int) -> str:
        from forge.cluster.ray import start_ray_if_multinode, stop_ray
        from forge.run.runner import run_forge

        cfg = job_config(job_cfg, shard)
        if not start_ray_if_multinode(cfg):
            return "ray worker done"  # a non-head node of a multi-node task
        logfile = task_log(cfg.output.dir, shard)
        try:
            code = run_forge(cfg, job_cfg, log_name=str(logfile.relative_to(cfg.output.dir)), merge=False)
        finally:
            if cfg.cluster.nodes_per_task > 1:
                stop_ray()
        if code != 0:
            raise ShardFailed(f"shard {shard} stopped (exit {code}); log: {logfile}")
        return "complete"


class StepJob(submitit.helpers.Checkpointable):
    """One task of a step that runs before the shard array (dedup's signatures, buckets,
    clusters): one array per step, each `afterok` on the one before, the shard array last.
    Resumable like a shard: a requeued task skips the files it already wrote."""

    def __call__(self, job_cfg: dict[str, Any], step: str, task: int) -> str:
        from forge.run.runner import run_step

        cfg = job_config(job_cfg, task)
        logfile = step_log(cfg.output.dir, step, task)
        code = run_step(cfg, job_cfg, step, task, log_name=str(logfile.relative_to(cfg.output.dir)))
        if code != 0:
            raise ShardFailed(f"{step} task {task} stopped (exit {code}); log: {logfile}")
        return "complete"


def step_log(out_dir: str | Path, step: str, task: int) -> Path:
    return Path(out_dir) / "logs" / f"forge_{step}{task:05d}.log"


class MonitorJob(submitit.helpers.Checkpointable):
    """Refreshes progress.json every `interval` seconds until no task of the array is left."""

    def __call__(self, out_dir: str, array_id: str, shard_jobs: dict[str, str], interval: float) -> dict[str, Any]:
        out = Path(out_dir)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        jobs = {job: int(shard) for shard, job in shard_jobs.items()}
        misses = 0
        hub = HubPublisher.for_run_dir(out)  # output.hub_repo: this job publishes while the array runs
        last_done = None
        while True:
            try:
                live = live_states([array_id])
                misses = 0
            except SlurmError as exc:  # a busy controller: try again, give up after ~10 tries
                misses += 1
                log.warning("monitor: %s", exc)
                if misses > 10:
                    raise
                time.sleep(interval)
                continue
            states = {jobs[j]: st for j, st in live.items() if j in jobs}
            summary = aggregate_progress(out, states)
            running = sum(1 for st in states.values() if st == "RUNNING")
            waiting = sum(1 for st in states.values() if st in ACTIVE) - running
            log.info(
                "monitor: %s/%s docs (%s%%), %d running, %d waiting, %.0f tok/s out",
                summary["done"],
                summary["total"],
                summary["percent"],
                running,
                waiting,
                summary["output_tokens_per_s"],
            )
            if hub:
                try:
                    last_done = publish_progress(hub, last_done)
                except Exception as exc:  # finalize (or a re-run) uploads what is left
                    log.warning("monitor: hub upload failed (%s); will try again", exc)
            if not any(st in ACTIVE for st in states.values()):
                break
            time.sleep(interval)
        finals = job_states([array_id])
        states = {jobs[j]: st for j, st in finals.items() if j in jobs}
        summary = aggregate_progress(out, states)
        failed = {s: st for s, st in states.items() if not shard_complete(out, s)}
        for shard, state in sorted(failed.items()):
            log.warning("monitor: shard %d ended %s without finishing; log: %s", shard, state, task_log(out, shard))
        log.info("monitor: array %s ended; %d shard(s) unfinished", array_id, len(failed))
        return {"unfinished": failed, "done": summary["done"], "total": summary["total"]}


class FinalizeJob:
    """Runs after every shard succeeded: the run's stats.json and final progress."""

    def __call__(self, out_dir: str, tasks: int) -> dict[str, Any]:
        from forge.run.runner import finish_run_dir

        out = Path(out_dir)
        missing = [s for s in range(tasks) if not shard_complete(out, s)]
        if missing:
            raise ShardFailed(f"finalize: shard(s) {missing} are not complete in {out}")
        with run_lock(out):  # a second finalize (or a local forge) on the same dir is refused
            hub = HubPublisher.for_run_dir(out)
            stats = finish_run_dir(out, hub.target.repo if hub else None)
            aggregate_progress(out)
            if hub:  # before finalized.json: a failed upload leaves finalize to be re-submitted
                publish_final(out, hub.target)
            done = {"finalized_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows_written": stats["rows_written"]}
            write_json_atomic(out / "slurm" / "finalized.json", done)
        print(f"forge: finalized {out}: {stats['rows_written']} rows; stats: {out / 'stats.json'}", flush=True)
        return done
