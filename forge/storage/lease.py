"""Who may write a remote run dir: a lease object `state/<name>.lease`, created only where none
is (S3's If-None-Match, GCS's generation 0), renewed while its holder runs, deleted at its end.

A second writer is refused with one line naming the holder. A holder killed with -9 leaves its
lease behind: it is stale at once for a process on the same machine (its pid is gone), and for
any machine once not renewed for storage.lease_s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from forge.storage.fs import StorageError, filesystem, join, retrying, settings

log = logging.getLogger("forge.storage.lease")
SUFFIX = ".lease"
VERIFY_S = 0.5  # after creating a lease, wait this long and read it back (two takers of one stale lease)


class LeaseHeld(StorageError):
    """Another forge process writes this remote run dir (or this shard of it) right now."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> int:
    """Containers on one host share its name and boot id, not their pid namespace."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _started(pid: int) -> str:
    """When process `pid` started (clock ticks since boot): a reused pid is another process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not started or _started(pid) in ("", started)


def holder_text(owner: dict[str, Any]) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')}"


def is_live(owner: dict[str, Any] | None) -> bool:
    """Whether a lease's holder may still be writing."""
    if not owner:
        return False
    here = owner.get("host") == socket.gethostname() and owner.get("boot") == _boot_id()
    if here and owner.get("pidns", _pid_namespace()) == _pid_namespace():
        return _alive(int(owner.get("pid", 0)), owner.get("started"))
    return time.time() - float(owner.get("renewed_at", 0)) < settings().lease_s


def _create(fs: Any, path: str, data: bytes) -> None:
    """Write `path` only if it does not exist (FileExistsError else)."""
    try:
        fs.pipe_file(path, data, mode="create")
        return
    except (TypeError, NotImplementedError):
        pass  # a store without conditional writes: check, write, read back
    if fs.exists(path):
        raise FileExistsError(path)
    fs.pipe_file(path, data)
    if fs.cat_file(path) != data:
        raise FileExistsError(path)


def read_owner(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}


def live_holders(url: str, *names: str, exclude: str | None = None) -> list[str]:
    """The holders of the run dir's live leases (all of them, or those named; not `exclude`)."""
    fs, root = filesystem(url)
    state = join(root, "state")
    try:
        paths = retrying(url, "list its leases", lambda: fs.glob(join(state, "*" + SUFFIX)), (FileNotFoundError,))
    except FileNotFoundError:
        return []
    found = []
    for path in sorted(paths):
        name = os.path.basename(path)[: -len(SUFFIX)]
        if (names and name not in names) or name == exclude:
            continue
        owner = retrying(url, "read a lease", lambda p=path: read_owner(fs, p))
        if is_live(owner):
            found.append(holder_text(owner or {}))
    return found


class Lease:
    """The lease `name` of the remote run dir `url`, held from acquire() to release()."""

    def __init__(self, url: str, name: str, busy: str) -> None:
        self.url = url
        self.name = name
        self.busy = busy  # the refusal, with {holder}
        self.fs, root = filesystem(url)
        self.path = join(root, "state", name + SUFFIX)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewed = time.monotonic()
        self.lost: str | None = None  # why this process may no longer write (taken over, unrenewable)

    def _owner(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "boot": _boot_id(),
            "pidns": _pid_namespace(),
            "started": _started(os.getpid()),
            "token": self.token,
            "renewed_at": time.time(),
        }

    def acquire(self) -> None:
        """Create the lease, or take over a stale one; refused (LeaseHeld) while it is live."""
        for _ in range(3):
            body = json.dumps(self._owner()).encode()
            try:
                retrying(self.url, "take its lock", lambda b=body: _create(self.fs, self.path, b), (FileExistsError,))
            except FileExistsError:
                owner = retrying(self.url, "read its lock", lambda: read_owner(self.fs, self.path))
                if is_live(owner):
                    raise LeaseHeld(self.busy.format(holder=holder_text(owner or {}))) from None
                self._remove_stale(owner)
                continue
            # two processes that both found the same stale lease: the one whose lease is there
            # after a moment keeps it, the other backs off
            time.sleep(VERIFY_S)
            owner = retrying(self.url, "read its lock", lambda: read_owner(self.fs, self.path))
            if owner is None or owner.get("token") != self.token:
                raise LeaseHeld(self.busy.format(holder=holder_text(owner or {})))
            break
        else:
            raise LeaseHeld(self.busy.format(holder="another process"))
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._renew_loop, name="forge-lease", daemon=True)
        self._thread.start()

    def _remove_stale(self, owner: dict[str, Any] | None) -> None:
        """Delete a stale lease, unless it changed since it was read (someone took it over)."""
        again = retrying(self.url, "read its lock", lambda: read_owner(self.fs, self.path))
        if again is None:
            return
        if again != owner:
            if is_live(again):
                raise LeaseHeld(self.busy.format(holder=holder_text(again)))
        gone = holder_text(again)
        log.warning("%s: the lock of %s was left by a process that is gone; taking it over", self.url, gone)
        with contextlib.suppress(FileNotFoundError):
            retrying(self.url, "remove a stale lock", lambda: self.fs.rm_file(self.path), (FileNotFoundError,))

    def _renew_loop(self) -> None:
        every = max(settings().lease_s / 4, 0.5)
        while not self._stop.wait(every):
            try:
                owner = read_owner(self.fs, self.path)
                if owner is None or owner.get("token") != self.token:
                    taken = holder_text(owner) if owner else "nobody (it was deleted)"
                    self.lost = f"{self.url}: its lock is now held by {taken}; this run stops writing it"
                    return
                self.fs.pipe_file(self.path, json.dumps(self._owner()).encode())
                self._renewed = time.monotonic()
            except Exception as exc:  # a missed renewal is retried next time; the run goes on
                log.warning("%s: could not renew its lock (%s)", self.url, exc)
                if time.monotonic() - self._renewed > settings().lease_s * 0.75:
                    self.lost = (
                        f"{self.url}: its lock could not be renewed for {settings().lease_s * 0.75:.0f} s "
                        f"({exc}); this run stops before another machine may take it over"
                    )
                    return

    def check(self) -> None:
        """Raise once this process may no longer write the run dir (its lease lost)."""
        if self.lost:
            raise LeaseHeld(self.lost + "; re-run the same command to resume")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
            try:
                owner = read_owner(self.fs, self.path)
                if owner is not None and owner.get("token") == self.token:
                    self.fs.rm_file(self.path)
            except Exception as exc:  # stale at once for a re-run here, after lease_s elsewhere
                log.warning("%s: could not remove its lock (%s)", self.url, exc)
