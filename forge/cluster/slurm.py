"""`cluster.backend=slurm`: submit a run as three Slurm jobs through submitit and return at once.

1. the shard array: one task per unfinished shard, at most cluster.workers at a time;
2. the monitor (`after` the array's first task starts): refreshes progress.json while the array
   runs and ends when it ends, whatever its fate;
3. finalize (`afterok` on the array, cancelled by Slurm if any shard fails): stats.json.

Submitted from the Hydra task with submitit directly, so `--multirun` submits every point without
blocking and a failed shard is a FAILED Slurm job. Re-running the same command re-submits only
unfinished shards, and refuses while an earlier submission of the same run dir is still queued or
running (two tasks on one shard would duplicate rows).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import submitit
from omegaconf import DictConfig, OmegaConf
from submitit.slurm.slurm import _make_sbatch_string

from forge.cluster.jobs import FinalizeJob, MonitorJob, ShardJob, StepJob, task_log
from forge.cluster.state import (
    ACTIVE,
    SlurmError,
    Submission,
    active_jobs,
    job_states,
    record_submission,
    shard_complete,
    shard_reports,
)
from forge.config import ForgeConfig, OnChange, gpus_per_task, slug
from forge.io.dataset import DatasetError
from forge.io.hub import HubError, preflight, target_from
from forge.io.secrets import lift_secrets, redact_override
from forge.run.locks import RunBusy, check_not_running, run_lock
from forge.run.output import RunChanged, is_finished, mark_finished, mark_started
from forge.run.progress import aggregate_progress
from forge.schema import ConfigError
from forge.stages.registry import hook
from forge.storage.fs import is_remote

ROLES = ("shards", "monitor", "finalize")


def sbatch_params(cfg: ForgeConfig, role: str, run_name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for one of the run's jobs (each maps to an #SBATCH line)."""
    c = cfg.cluster
    params: dict[str, Any] = {
        "job_name": f"forge-{role}-{run_name}",
        "partition": c.partition,
        "qos": c.qos,
        "account": c.account,
        "signal_delay_s": c.signal_delay_s,
        "setup": list(c.setup) or None,
        "additional_parameters": {"requeue": True},
    }
    if role == "shards":
        gpus = gpus_per_task(cfg)
        per_node = gpus // c.nodes_per_task
        params.update(
            time=c.time_min,
            nodes=c.nodes_per_task,
            ntasks_per_node=1,
            constraint=c.constraint,
            exclude=c.exclude,
            array_parallelism=c.workers or c.tasks,
        )
        if per_node:
            params["gpus_per_node"] = per_node
            params["cpus_per_task"] = (c.cpus_per_gpu or 1) * per_node
            if c.mem_per_gpu_gb:
                params["mem"] = f"{c.mem_per_gpu_gb * per_node}GB"
        else:
            params["cpus_per_task"] = c.cpus_per_task
            if c.mem_gb:
                params["mem"] = f"{c.mem_gb}GB"
        params["additional_parameters"].update({str(k): v for k, v in c.sbatch_extra.items()})
    else:  # small CPU jobs: one core, no GPU
        params.update(time=c.time_min if role == "monitor" else 60, cpus_per_task=1, mem="2GB")
        if role == "finalize":
            params["additional_parameters"]["kill-on-invalid-dep"] = "yes"
    return {k: v for k, v in params.items() if v is not None}


def render_sbatch(cfg: ForgeConfig, role: str, folder: Path, python: str | None = None) -> str:
    """The sbatch script submitit submits for `role`, without submitting (dry runs, golden tests)."""
    params = sbatch_params(cfg, role, run_name(cfg))
    if role == "shards" and cfg.cluster.tasks > 1:
        params["map_count"] = cfg.cluster.tasks  # an array, as submitit writes it for a batch
    elif role != "shards":  # the array's id is known only once it is submitted
        params["dependency"] = "after:ARRAY_ID_0" if role == "monitor" else "afterok:ARRAY_ID"
    command = " ".join([python or shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **params)


def run_name(cfg: ForgeConfig) -> str:
    return slug(Path(cfg.output.dir).name)


def job_payload(cfg: ForgeConfig, raw: DictConfig | dict) -> dict[str, Any]:
    """The resolved config the nodes run: absolute run dir, never `fresh` (the submitter did that)."""
    data = raw if isinstance(raw, dict) else OmegaConf.to_container(raw, resolve=True, enum_to_str=True)
    data = dict(data)
    data["output"] = {**data["output"], "dir": cfg.output.dir, "on_change": OnChange.error.value}
    # secrets travel in the environment sbatch passes on, never in submitit's pickles
    data, env = lift_secrets(data)
    os.environ.update(env)
    return data


def _executor(cfg: ForgeConfig, role: str, folder: Path, **extra: Any) -> submitit.SlurmExecutor:
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.cluster.max_requeues)
    params = sbatch_params(cfg, role, run_name(cfg))
    if role == "shards" and "dependency" in extra:  # after a step array: gone if that step fails
        params["additional_parameters"]["kill-on-invalid-dep"] = "yes"
    ex.update_parameters(**params, **extra)
    return ex


def _say(text: str) -> None:
    print(f"forge: {text}", flush=True)


def report_unfinished(out: Path, tasks: int) -> list[str]:
    """Lines about shards of earlier submissions that ended without finishing."""
    lines = []
    for r in shard_reports(out, tasks):
        if r.complete or r.job is None or r.state in ACTIVE:
            continue
        why = f": {r.error}" if r.error else ""
        lines.append(f"shard {r.shard} (job {r.job}) ended {r.state}{why}; log: {r.log or task_log(out, r.shard)}")
    return lines


def submit(cfg: ForgeConfig, raw: DictConfig | dict, overrides: list[str] | None = None) -> int:
    """Submit the unfinished shards of the run and return at once (or wait with cluster.wait)."""
    code, sub = submit_run(cfg, raw, overrides)
    if sub is not None and cfg.cluster.wait:
        return wait(Path(cfg.output.dir), sub, cfg.cluster.tasks)
    return code


def submit_run(
    cfg: ForgeConfig, raw: DictConfig | dict, overrides: list[str] | None = None, after: list[str] | None = None
) -> tuple[int, Submission | None]:
    """Submit the unfinished shards of the run: (exit code, the submission or None).

    `after`: job ids the run's first arrays wait for (`afterok`; a recipe's earlier steps). Its
    input does not exist yet, so the input checks run in the jobs, not here: the config was
    validated when the recipe was composed."""
    if is_remote(cfg.output.dir):
        _say(
            f"error: output.dir: {cfg.output.dir} is on an object store; a Slurm submission needs a run dir "
            "on the cluster's shared disk (or run forge itself on a node: it resumes any remote run dir)"
        )
        return 2, None
    out = Path(cfg.output.dir).resolve()
    cfg.output.dir = str(out)
    out.mkdir(parents=True, exist_ok=True)
    c = cfg.cluster
    if c.dry_run:
        return dry_run(cfg, out), None
    try:
        active = active_jobs(out)
        if active:
            ids = sorted({j.split("_")[0] for j in active})
            _say(
                f"error: {out} is already queued or running as Slurm job(s) {', '.join(ids)} "
                f"({', '.join(sorted(set(active.values())))}); not submitting it twice.\n"
                f"  follow it:  forge-status {out}\n  stop it:    scancel {' '.join(ids)}"
            )
            return 1, None
        for line in report_unfinished(out, c.tasks):
            _say(line)
    except SlurmError as exc:
        _say(f"error: {exc}")
        return 1, None
    try:
        check_not_running(out)  # a local forge writing this dir: never move it aside or add to it
        with run_lock(out):  # held from the checks to the last write here, released before sbatch
            prepared = _prepare(cfg, raw, overrides, out, after)
    except RunBusy as exc:
        _say(f"error: {exc}")
        return 1, None
    except (ConfigError, DatasetError, RunChanged, HubError) as exc:
        _say(f"error: {exc}")
        return 2, None
    if prepared is None:
        return 0, None
    pending, steps, payload = prepared
    folder = out / "slurm" / "%j"
    try:
        sub = _submit_jobs(cfg, out, folder, payload, pending, steps, after)
    except (SlurmError, submitit.core.utils.FailedJobError, RuntimeError) as exc:
        _say(f"error: submission failed: {exc}")
        return 1, None
    record_submission(out, sub)
    _print_submitted(out, sub, c.tasks)
    return 0, sub


def _prepare(
    cfg: ForgeConfig, raw: DictConfig | dict, overrides: list[str] | None, out: Path, after: list[str] | None = None
) -> tuple | None:
    """The run's checks (which may move a changed dir aside) and its config written, under the run
    lock: (pending shards, pending steps, the jobs' payload), or None when nothing is left to do."""
    from forge.run.card_parts import record_command
    from forge.run.runner import prepare_run, save_config

    c = cfg.cluster
    if after:  # its input is written by the jobs it waits for: checked when its own jobs start
        planned = hook(cfg.pipeline.stage, "planned_steps")
        steps = [(s, list(range(n))) for s, n in planned(cfg)] if planned else []
    else:
        run = prepare_run(cfg)
        steps = run.pre_steps() if hasattr(run, "pre_steps") else []
    hub = target_from(cfg.output)
    if hub:
        preflight(hub)  # a bad token fails now, not in a job after GPU hours
    pending = [s for s in range(c.tasks) if not shard_complete(out, s)]
    if not pending and not any(t for _, t in steps) and (out / "slurm" / "finalized.json").exists():
        _say(f"all {c.tasks} shard(s) of {out} are complete; nothing to submit. stats: {out / 'stats.json'}")
        if not is_finished(out):  # finalized before finished.json existed
            mark_finished(out, {})
        return None
    mark_started(out)  # unfinished for the next stage until the finalize job runs
    payload = job_payload(cfg, raw)
    save_config(payload, out)
    if overrides is not None:
        record_command(out, overrides)
    return pending, steps, payload


def _submit_steps(
    cfg: ForgeConfig, folder: Path, payload: dict, steps: list[tuple[str, list[int]]], after: str | None = None
) -> dict[str, str]:
    """One array per step with unfinished tasks, each `afterok` on the one before (the first on
    `after`, when given): step -> array id."""
    arrays: dict[str, str] = {}
    for step, tasks in steps:
        if not tasks:
            continue
        ex = _executor(cfg, "shards", folder, **({"dependency": f"afterok:{after}"} if after else {}))
        parallel = cfg.cluster.workers or len(tasks)
        ex.update_parameters(job_name=f"forge-{step}-{run_name(cfg)}", array_parallelism=parallel)
        with ex.batch():
            submitted = [ex.submit(StepJob(), payload, step, t) for t in tasks]
        after = arrays[step] = submitted[0].job_id.split("_")[0]
    return arrays


def _submit_jobs(
    cfg: ForgeConfig,
    out: Path,
    folder: Path,
    payload: dict,
    pending: list[int],
    steps: list | None = None,
    after: list[str] | None = None,
) -> Submission:
    c = cfg.cluster
    jobs: dict[str, str] = {}
    logs: dict[str, str] = {}
    array_id = monitor_id = None
    upstream = ":".join(after) if after else None
    step_arrays = _submit_steps(cfg, folder, payload, steps or [], upstream)
    last_step = list(step_arrays.values())[-1] if step_arrays else upstream
    if pending:
        ex = _executor(cfg, "shards", folder, **({"dependency": f"afterok:{last_step}"} if last_step else {}))
        with ex.batch():
            submitted = [(s, ex.submit(ShardJob(), payload, s)) for s in pending]
        for shard, job in submitted:
            jobs[str(shard)] = job.job_id
            logs[str(shard)] = str(job.paths.stderr)
        array_id = submitted[0][1].job_id.split("_")[0]
        first = submitted[0][1].job_id
        mon = _executor(cfg, "monitor", folder, dependency=f"after:{first}")
        monitor_id = mon.submit(MonitorJob(), str(out), array_id, jobs, c.monitor_interval_s).job_id
    fin_after = array_id or last_step
    fin_extra = {"dependency": f"afterok:{fin_after}"} if fin_after else {}
    fin = _executor(cfg, "finalize", folder, **fin_extra)
    finalize_id = fin.submit(FinalizeJob(), str(out), c.tasks).job_id
    return Submission(
        submitted_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        array_id=array_id,
        jobs=jobs,
        logs=logs,
        monitor_id=monitor_id,
        finalize_id=finalize_id,
        command=" ".join(shlex.quote(redact_override(a)) for a in ["forge", *sys.argv[1:]]),
        extra={"steps": step_arrays} if step_arrays else {},
    )


def _print_submitted(out: Path, sub: Submission, tasks: int) -> None:
    done = tasks - len(sub.jobs)
    for step, array in (sub.extra.get("steps") or {}).items():
        _say(f"submitted step {step}: array {array}")
    if sub.array_id:
        throttle = f"{len(sub.jobs)} shard(s)" + (f", {done} already complete" if done else "")
        _say(f"submitted array {sub.array_id} ({throttle}), monitor {sub.monitor_id}, finalize {sub.finalize_id}")
    else:
        _say(f"every shard is complete; submitted finalize {sub.finalize_id}")
    _say(f"run dir:  {out}")
    _say(f"follow:   forge-status {out}   (or: tail -f {out}/slurm/{sub.monitor_id}/*_log.out)")
    _say(f"progress: {out / 'progress.json'}; logs: {out / 'logs'}; stop: scancel {' '.join(sub.job_ids())}")


def wait(out: Path, sub: Submission, tasks: int, poll_s: float = 5.0) -> int:
    """cluster.wait: block until the array and finalize end; report; 0 only if all succeeded."""
    ids = [j for j in (sub.array_id, sub.finalize_id) if j]
    last_line = 0.0
    while True:
        try:
            live = {j: s for j, s in job_states(ids).items() if s in ACTIVE}
        except SlurmError as exc:
            _say(f"warning: {exc}")
            live = {"?": "UNKNOWN"}
        if not live:
            break
        if time.monotonic() - last_line > 60:
            last_line = time.monotonic()
            p = aggregate_progress(out)
            _say(f"waiting: {p['done']}/{p['total']} docs, {len(live)} job(s) queued or running")
        time.sleep(poll_s)
    problems = report_unfinished(out, tasks)
    for line in problems:
        _say(line)
    final = job_states([sub.finalize_id]).get(sub.finalize_id or "", "UNKNOWN")
    if problems or final != "COMPLETED":
        _say(f"run not complete (finalize job {sub.finalize_id}: {final}); re-run the same command to resume")
        return 1
    _say(f"done: {out}; stats: {out / 'stats.json'}")
    return 0


def dry_run(cfg: ForgeConfig, out: Path) -> int:
    """Write the sbatch scripts that would be submitted, and the shards they would cover."""
    target = out / "slurm" / "dry_run"
    target.mkdir(parents=True, exist_ok=True)
    for role in ROLES:
        (target / f"{role}.sbatch").write_text(render_sbatch(cfg, role, out / "slurm" / "%j"))
    pending = [s for s in range(cfg.cluster.tasks) if not shard_complete(out, s)]
    _say(f"dry run: sbatch scripts in {target}; would submit {len(pending)} shard(s): {pending}")
    return 0
