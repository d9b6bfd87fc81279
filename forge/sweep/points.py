"""Sweep points (conf/sweep/*.yaml, `forge +sweep=NAME` or `forge --multirun ...`).

A benchmark sweep is re-run until every point has an answer, so a re-run must not redo what is
settled: a point that finished is skipped (running it again would append an empty session to its
stats and its throughput would be lost), and so is a point that failed for a known reason (OOM,
start-up timeout, engine failure: the same settings fail the same way) unless
`sweep.retry_failed=true`. Failures are classified from the point's own logs, each point's outcome
is kept in `<point>/sweep_point.json`, and the failures are listed when the sweep ends. One
point's failure never stops the others; the sweep exits 1 if any point failed.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from forge.config import Backend, ForgeConfig

POINT_FILE = "sweep_point.json"


class FailureClass(str, Enum):
    oom = "oom"
    startup_timeout = "startup_timeout"
    server_failure = "server_failure"  # the engine process exited during start-up or died mid-run
    other = "other"


KNOWN = {FailureClass.oom, FailureClass.startup_timeout, FailureClass.server_failure}

# First match wins, in this order: an OOM at start-up also reads "engine exited with code 1".
PATTERNS: list[tuple[FailureClass, re.Pattern[str]]] = [
    (
        FailureClass.oom,
        re.compile(
            r"CUDA out of memory|CUDA error: out of memory|OutOfMemoryError|No available memory for the cache blocks"
            r"|less than desired GPU memory utilization|larger than the maximum number of tokens that can be "
            r"stored in KV cache|Not enough memory",
            re.I,
        ),
    ),
    (FailureClass.startup_timeout, re.compile(r"not ready after .*\(model\.startup_timeout_s\)")),
    (
        FailureClass.server_failure,
        re.compile(
            r"engine exited with code .* during start-up|engine died \(exit code|vLLM failed to start"
            r"|vLLM engine failed|EngineDeadError|EngineCore .*(died|failed)"
        ),
    ),
]
ENGINE_ERROR = re.compile(r"error|exception|killed|signal", re.I)  # the engine's own words, for server_failure
FORGE_LOGS = ("forge.log", "logs/forge_task*.log")  # local run / Slurm array task
ENGINE_LOGS = ("logs/engine_task*.log",)
LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ [\w.]+: ")  # forge.log's line prefix
RUN_MARK = "=== forge run "  # runner.py starts each invocation's log section with it
START_MARK = "=== forge: starting "  # engine/server.py, before each engine start


@dataclass
class Failure:
    """Why a point failed: its class, the log line that tells, and the file it is in."""

    cls: FailureClass
    line: str
    log: str
    detail: str = ""  # for an engine that exited: its own last error line

    def to_json(self) -> dict[str, str]:
        return {"class": self.cls.value, "line": self.line, "log": self.log, "detail": self.detail}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Failure:
        return cls(FailureClass(data["class"]), data.get("line", ""), data.get("log", ""), data.get("detail", ""))


@dataclass
class Outcome:
    """One point of this sweep: what became of it, and whether this run skipped it."""

    point: str
    status: str  # finished | failed | submitted | dry_run | unfinished | interrupted
    failure: Failure | None = None
    skipped: bool = False


_outcomes: list[Outcome] = []  # the points this process ran or skipped (Hydra runs them in-process)


def log_files(point: Path) -> list[Path]:
    return [p for pattern in (*FORGE_LOGS, *ENGINE_LOGS) for p in sorted(point.glob(pattern))]


def log_sizes(point: Path) -> dict[str, int]:
    """Where each log ends now: a classification after the run reads only what the run wrote."""
    return {str(p): p.stat().st_size for p in log_files(point)}


def _last_section(text: str, mark: str) -> str:
    at = text.rfind(mark)
    return text[at:] if at >= 0 else text


def _read_logs(point: Path, since: dict[str, int] | None) -> list[tuple[Path, str]]:
    """(file, text) of each log: the bytes after `since`, or without it the last run's section
    of forge logs and the last engine start's section of engine logs."""
    out = []
    for path in log_files(point):
        with open(path, "rb") as fh:
            if since is not None:
                fh.seek(since.get(str(path), 0))
            text = fh.read().decode(errors="replace")
        if since is None:
            text = _last_section(text, START_MARK if path.name.startswith("engine_") else RUN_MARK)
        out.append((path, text))
    return out


def classify(point: Path, since: dict[str, int] | None = None) -> Failure:
    """The failure class of a failed point, from its forge and engine logs (see PATTERNS)."""
    logs = _read_logs(point, since)
    for cls, pattern in PATTERNS:
        for path, text in logs:
            for line in text.splitlines():
                if pattern.search(line):
                    detail = _engine_error(logs) if cls == FailureClass.server_failure else ""
                    return Failure(cls, _clip(line), str(path), detail)
    for path, text in logs:  # forge logs come first: their last ERROR line says what stopped the run
        errors = [line for line in text.splitlines() if " ERROR " in line]
        if errors:
            return Failure(FailureClass.other, _clip(errors[-1]), str(path))
    return Failure(FailureClass.other, "no error line in the point's logs", str(point / "forge.log"))


def _engine_error(logs: list[tuple[Path, str]]) -> str:
    """The engine log's last line that names an error (what forge's own line cannot know)."""
    for path, text in logs:
        if path.name.startswith("engine_"):
            errors = [line for line in text.splitlines() if ENGINE_ERROR.search(line) and START_MARK not in line]
            if errors:
                return _clip(errors[-1])
    return ""


def _clip(line: str, limit: int = 300) -> str:
    line = LOG_PREFIX.sub("", line.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_finished(point: Path, tasks: int) -> bool:
    """stats.json covers every shard and each shard's last session completed (forge writes
    stats.json after a failure too, with that session's status `failed`)."""
    stats = _read_json(point / "stats.json")
    if not stats:
        return False
    last = stats.get("last_sessions") or []
    return stats.get("tasks") == tasks and len(last) == tasks and all(s.get("status") == "complete" for s in last)


def has_failed_session(point: Path) -> bool:
    """A shard whose last session failed (a Slurm task records it in its own stats file)."""
    for path in sorted((point / "stats").glob("task_*.json")):
        sessions = (_read_json(path) or {}).get("sessions") or []
        if sessions and sessions[-1].get("status") == "failed":
            return True
    return False


def recorded_failure(point: Path) -> Failure | None:
    """The failure recorded by the last local run of the point, or read now from the logs of a
    shard that failed elsewhere (Slurm); None when the point has not failed."""
    record = _read_json(point / POINT_FILE) or {}
    if record.get("status") == "failed" and record.get("failure"):
        try:
            return Failure.from_json(record["failure"])
        except (KeyError, ValueError):
            pass
    return classify(point) if has_failed_session(point) else None


def settled(point: Path, cfg: ForgeConfig) -> Outcome | None:
    """The outcome that makes this run skip the point, or None to run it."""
    if is_finished(point, cfg.cluster.tasks):
        return Outcome(str(point), "finished", skipped=True)
    failure = recorded_failure(point)
    if failure and failure.cls in KNOWN and not cfg.sweep.retry_failed:
        return Outcome(str(point), "failed", failure, skipped=True)
    return None


def _write_record(point: Path, outcome: Outcome, overrides: list[str], code: int | None) -> None:
    from forge.run.output import write_json_atomic

    previous = _read_json(point / POINT_FILE) or {}
    record = {
        "status": outcome.status,
        "failure": outcome.failure.to_json() if outcome.failure else None,
        "exit_code": code,
        "attempts": int(previous.get("attempts", 0)) + 1,
        "overrides": overrides,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    point.mkdir(parents=True, exist_ok=True)
    write_json_atomic(point / POINT_FILE, record)


def run_point(cfg: ForgeConfig, overrides: list[str], launch: Callable[[], int]) -> Outcome:
    """Run one sweep point with `launch` (run_forge or the Slurm submission) unless it is settled;
    record and return its outcome. Never exits: the next point runs whatever happened here,
    except after Ctrl-C, which stops the sweep."""
    from forge.io.secrets import redact_override

    point = Path(cfg.output.dir)
    if cfg.output.hub_repo and not any(o.lstrip("+").startswith("output.hub_repo=") for o in overrides):
        config_failed(
            point,
            overrides,
            f"output.hub_repo: every point of this sweep would publish its chunks to {cfg.output.hub_repo}, "
            "mixing their rows; sweep output.hub_repo along with the grid or publish a single run",
        )
        print(f"forge: sweep point {point}: refused, output.hub_repo is shared by every point", file=sys.stderr)
        return _outcomes[-1]
    outcome = settled(point, cfg)
    if outcome:
        why = "finished earlier" if outcome.status == "finished" else f"failed earlier ({outcome.failure.cls.value})"
        print(f"forge: sweep point {point}: skipped, {why}", file=sys.stderr)
        _outcomes.append(outcome)
        return outcome
    before = log_sizes(point)
    try:
        code = launch()
    except Exception as exc:  # a bug must not cost the other points their run; listed at the end
        print(f"forge: sweep point {point}: crashed: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        code, crash = 1, Failure(FailureClass.other, _clip(f"{exc.__class__.__name__}: {exc}"), "")
    else:
        crash = None
    submitted = cfg.cluster.backend == Backend.slurm and not cfg.cluster.wait  # its jobs have not run yet
    if code == 130:
        outcome = Outcome(str(point), "interrupted")
    elif code == 0:
        status = "finished" if is_finished(point, cfg.cluster.tasks) else "unfinished"
        if submitted:
            status = "dry_run" if cfg.cluster.dry_run else "submitted"
        outcome = Outcome(str(point), status)
    else:
        failure = crash or (_submission_failure(point, before, code) if submitted else classify(point, before))
        outcome = Outcome(str(point), "failed", failure)
    _write_record(point, outcome, [redact_override(o) for o in overrides], code)
    _outcomes.append(outcome)
    if code == 130:
        raise SystemExit(130)
    return outcome


def _submission_failure(point: Path, before: dict[str, int], code: int) -> Failure:
    """A Slurm submission that failed is no engine failure: class `other`, so a re-run retries it."""
    found = classify(point, before)
    if found.cls == FailureClass.other:
        return found
    return Failure(FailureClass.other, f"Slurm submission failed (exit code {code})", str(point / "forge.log"))


def config_failed(point: Path, overrides: list[str], message: str) -> None:
    """A point whose values do not validate: listed with the others, re-run every time."""
    outcome = Outcome(str(point), "failed", Failure(FailureClass.other, f"config error: {message}", ""))
    _write_record(point, outcome, overrides, 2)
    _outcomes.append(outcome)


def report() -> int:
    """Print how the sweep's points ended and every failure with its class and log line; 1 if
    any point failed. Nothing (0) when no sweep ran in this process."""
    if not _outcomes:
        return 0
    counts: dict[str, int] = {}
    for o in _outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    skipped = sum(o.skipped for o in _outcomes)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    print(f"forge: sweep of {len(_outcomes)} point(s): {summary} ({skipped} skipped as settled earlier)")
    failed = [o for o in _outcomes if o.failure]
    for o in failed:
        f = o.failure
        note = " [skipped; sweep.retry_failed=true re-runs it]" if o.skipped else ""
        extra = (f"\n    engine: {f.detail}" if f.detail else "") + (f"\n    log: {f.log}" if f.log else "")
        print(f"  FAILED {o.point}: {f.cls.value}{note}\n    {f.line}{extra}")
    return 1 if failed else 0
