"""What became of a run's Slurm jobs: the submissions recorded in <run dir>/slurm/jobs.json,
their live state from squeue and their final state from sacct, and per shard whether its
output is complete. Used before a re-submission (never run a shard twice), by `cluster.wait`,
by the monitor job and by `forge-status`."""

from __future__ import annotations

import getpass
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge.io.secrets import redact_strings

ACTIVE = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "RESIZING",
    "SUSPENDED",
    "STAGE_OUT",
    "SIGNALING",
    "STOPPED",
    "RESV_DEL_HOLD",
}


class SlurmError(RuntimeError):
    """A Slurm command failed; the message holds the command and what it printed."""


def slurm_cmd(args: list[str], timeout: float = 60, tries: int = 3) -> str:
    """Run a Slurm client command, retrying the transient 'controller busy' failures."""
    last = ""
    for attempt in range(tries):
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise SlurmError(f"{args[0]}: not found; is this a Slurm login node (and SLURM_CONF set)?") from None
        except subprocess.TimeoutExpired:
            last = f"timed out after {timeout:.0f} s"
        else:
            if proc.returncode == 0:
                return proc.stdout
            last = (proc.stderr or proc.stdout).strip()
        time.sleep(1 + attempt)
    raise SlurmError(f"`{' '.join(args)}` failed: {last}")


def live_states(job_ids: list[str]) -> dict[str, str]:
    """JobID (array tasks expanded, `123_4`) -> state, for jobs Slurm still holds.

    Lists this user's jobs and filters here: `squeue -j` fails outright on an id the controller
    has already forgotten."""
    if not job_ids:
        return {}
    out = slurm_cmd(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T"])
    wanted = set(job_ids)
    states = {}
    for line in out.splitlines():
        if "|" not in line:
            continue
        jid, state = line.strip().split("|", 1)
        if jid in wanted or jid.split("_")[0] in wanted:
            states[jid] = state
    return states


def final_states(job_ids: list[str]) -> dict[str, str]:
    """JobID -> state from the accounting database (sacct), first word only (`CANCELLED by 0`)."""
    if not job_ids:
        return {}
    try:
        out = slurm_cmd(["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), "-o", "JobID,State"])
    except SlurmError:
        return {}  # no accounting: callers fall back to what the shard outputs say
    states = {}
    for line in out.splitlines():
        if "|" in line:
            jid, state = line.strip().split("|", 1)
            states[jid] = state.split()[0] if state else "UNKNOWN"
    return states


def job_states(job_ids: list[str]) -> dict[str, str]:
    """Live state where Slurm still holds the job, else the accounted final state."""
    states = final_states(job_ids)
    states.update(live_states(job_ids))
    return states


@dataclass
class Submission:
    """One `forge` submission: an array over some shards, a monitor and a finalize job."""

    submitted_at: str
    array_id: str | None
    jobs: dict[str, str]  # shard -> its job id (`123_4`, or `123` when the array has one task)
    logs: dict[str, str]  # shard -> submitit stderr path
    monitor_id: str | None = None
    finalize_id: str | None = None
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shards(self) -> list[int]:
        return [int(s) for s in self.jobs]

    def shard_job(self, shard: int) -> str:
        return self.jobs[str(shard)]

    def job_ids(self) -> list[str]:
        return [j for j in (self.array_id, self.monitor_id, self.finalize_id) if j]


def history_path(out_dir: Path) -> Path:
    return out_dir / "slurm" / "jobs.json"


def load_history(out_dir: Path) -> list[Submission]:
    path = history_path(out_dir)
    if not path.exists():
        return []
    return [Submission(**entry) for entry in json.loads(path.read_text())]


def record_submission(out_dir: Path, sub: Submission) -> None:
    path = history_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [s.__dict__ for s in load_history(out_dir)] + [sub.__dict__]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(redact_strings(entries), indent=1))  # the command line may hold a key
    tmp.replace(path)


def shard_complete(out_dir: Path, shard: int) -> bool:
    """The shard's last session finished every row (its stats file says so)."""
    path = out_dir / "stats" / f"task_{shard:05d}.json"
    try:
        sessions = json.loads(path.read_text()).get("sessions", [])
    except (OSError, ValueError):
        return False
    return bool(sessions) and sessions[-1].get("status") == "complete"


def last_error(*logs: Path) -> str | None:
    """The most telling line of a failed task's logs: forge's own error, else the last traceback line."""
    for path in logs:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in reversed(lines):
            if "forge: error:" in line:
                return line[line.index("forge: error:") + len("forge: ") :].strip()
        for line in reversed(lines):
            text = line.strip()
            if text and (text.split(":")[0].endswith(("Error", "Exception", "Failed")) or " ERROR " in text):
                return text[-400:]
    return None


@dataclass
class ShardReport:
    shard: int
    job: str | None
    state: str
    complete: bool
    log: str | None
    error: str | None = None


def shard_reports(out_dir: Path, tasks: int, history: list[Submission] | None = None) -> list[ShardReport]:
    """Per shard: its latest job and that job's state, whether its output is complete, and for a
    failed one the log to read and the error line."""
    history = load_history(out_dir) if history is None else history
    latest: dict[int, Submission] = {}
    for sub in history:
        for shard in sub.shards:
            latest[shard] = sub
    ids = sorted({s.array_id for s in latest.values() if s.array_id})
    states = job_states(ids)
    reports = []
    for shard in range(tasks):
        done = shard_complete(out_dir, shard)
        sub = latest.get(shard)
        if sub is None or not sub.array_id:
            reports.append(ShardReport(shard, None, "COMPLETED" if done else "NOT_SUBMITTED", done, None))
            continue
        job = sub.shard_job(shard)
        state = states.get(job) or states.get(sub.array_id) or "UNKNOWN"
        log = sub.logs.get(str(shard))
        report = ShardReport(shard, job, state, done, log)
        if not done and state not in ACTIVE:
            task_log = out_dir / "logs" / f"forge_task{shard:05d}.log"
            report.error = last_error(*(Path(p) for p in (log,) if p), task_log)
        reports.append(report)
    return reports


def active_jobs(out_dir: Path) -> dict[str, str]:
    """Jobs of this run dir that Slurm still runs or holds (array tasks and finalize)."""
    history = load_history(out_dir)
    ids = [j for sub in history for j in (sub.array_id, sub.finalize_id, *(sub.extra.get("steps") or {}).values()) if j]
    return {jid: st for jid, st in live_states(ids).items() if st in ACTIVE}


def live_job_ids(out_dir: Path) -> list[str]:
    """Job ids of the run dir's Slurm submissions still queued or running; none when it never had
    one, or when no Slurm client answers here (then they cannot be asked about)."""
    if not history_path(out_dir).exists():
        return []
    try:
        return sorted({j.split("_")[0] for j in active_jobs(out_dir)})
    except (SlurmError, OSError):
        return []
