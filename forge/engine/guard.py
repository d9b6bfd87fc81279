"""`python -m forge.engine.guard CMD...`: runs an engine server and takes its whole process group
down when forge dies, even by SIGKILL.

Why: PR_SET_PDEATHSIG reaches only the process forge started. `vllm serve` forks its engine core
(and its workers) below that one; if those outlive the API server they keep the GPU. The guard is
the group leader forge starts (in a session of its own); it gets SIGTERM when forge dies, and also
checks every second that forge is still its parent, then SIGKILLs the group: the engine, its engine
core, its workers, itself. A SIGTERM while forge lives is forge stopping the engine: the engine got
it too (the whole group did), and the guard waits for it to exit gracefully.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1


def _kill_group() -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m forge.engine.guard CMD [ARG...]", file=sys.stderr)
        return 2
    forge_pid = int(os.environ.get("FORGE_PARENT_PID", os.getppid()))

    def on_term(signum: int, frame: object) -> None:
        if os.getppid() != forge_pid:
            _kill_group()  # forge is gone: nothing may outlive it

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is forge's to handle
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux/glibc: the parent check below still applies
        pass
    if os.getppid() != forge_pid:
        return 1
    try:
        proc = subprocess.Popen(args, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    except FileNotFoundError as exc:
        print(f"forge guard: cannot run {exc.filename!r}: no such file", file=sys.stderr)
        return 127
    while True:
        try:
            code = proc.wait(timeout=1.0)
            return code if code >= 0 else 128 - code
        except subprocess.TimeoutExpired:
            if os.getppid() != forge_pid:
                _kill_group()


if __name__ == "__main__":
    sys.exit(main())
