"""The engine guard: when forge dies, even by SIGKILL, the engine's whole process group goes with
it (a `vllm serve` forks its engine core below the process forge started)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

# a stand-in for forge: starts the guard the way forge/engine/server.py does, with an "engine"
# that forks a grandchild of its own, then waits to be killed
FORGE = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from forge.engine.server import _die_with_parent
    parent = os.getpid()
    engine = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    proc = subprocess.Popen(
        [sys.executable, "-m", "forge.engine.guard", "--", sys.executable, "-c", engine],
        env={**os.environ, "FORGE_PARENT_PID": str(parent)},
        preexec_fn=lambda: _die_with_parent(parent),
    )
    print(proc.pid, flush=True)
    time.sleep(300)
    """
)


def _group_alive(pgid: int) -> bool:
    """Any process of the group still running (a zombie waiting for its parent to reap it is not)."""
    pids = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            return True
    return False


def _start(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    forge = subprocess.Popen([sys.executable, "-c", FORGE], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    guard = int(forge.stdout.readline())
    deadline = time.time() + 10
    while time.time() < deadline:  # the engine and its grandchild are up
        out = subprocess.run(["pgrep", "-g", str(guard)], capture_output=True, text=True).stdout.split()
        if len(out) >= 3:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the guarded engine did not start")
    return forge, guard


def test_sigkilled_forge_takes_the_whole_engine_group_down(tmp_path: Path) -> None:
    forge, group = _start(tmp_path)
    forge.kill()
    forge.wait()
    deadline = time.time() + 5
    while _group_alive(group) and time.time() < deadline:
        time.sleep(0.1)
    assert not _group_alive(group), "engine processes outlived a SIGKILLed forge"


def test_stopping_the_engine_while_forge_lives_is_graceful(tmp_path: Path) -> None:
    forge, group = _start(tmp_path)
    try:
        os.killpg(group, signal.SIGTERM)  # what LocalServer.stop() sends first
        deadline = time.time() + 5
        while _group_alive(group) and time.time() < deadline:
            time.sleep(0.1)
        assert not _group_alive(group)
    finally:
        forge.kill()
        forge.wait()
