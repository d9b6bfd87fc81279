"""A step's identity: a hash of its resolved settings and of its inputs' identities.

Settings are the typed config of the step with every knob marked `neutral` (forge/schema.py:
progress, workers, in-flight limits, timeouts, where the output goes, cluster placement) left
out, and with only the groups the step's stage reads (the shared groups and its own, from the
registry). Inputs are the fingerprints of the steps it reads, and for a dataset the content of its
local files (size and hash) or, for a Hub dataset, its name and revision. The same settings and
inputs give the same fingerprint, so a setting switched back finds its earlier output.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from enum import Enum
from pathlib import Path
from typing import Any

import xxhash

from forge.schema import NEUTRAL
from forge.stages.registry import spec
from forge.storage.fs import is_remote

FORMAT = 1  # bump when forge writes the same settings differently (every step then re-runs)
SHARED = ("pipeline", "dataset", "output", "run", "cluster")
WHOLE_FILE = 64 << 20  # files up to this size are hashed whole; larger: size, first and last MiB
STEP_INPUT = "step:"  # a dataset.name standing for an earlier step's output, in the settings


def settings_of(obj: Any) -> Any:
    """A config tree as plain JSON values, without the neutral knobs."""
    if dataclasses.is_dataclass(obj):
        return {
            f.name: settings_of(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.metadata.get(NEUTRAL)
        }
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, dict):
        return {str(k): settings_of(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [settings_of(v) for v in obj]
    return obj


def step_settings(cfg: Any) -> dict[str, Any]:
    """What a step's result depends on, from its typed config: the shared groups its stage uses
    (registry `uses`) and its own."""
    stage = spec(cfg.pipeline.stage)
    groups = [*SHARED, *stage.uses, *stage.groups]
    return {key: settings_of(getattr(cfg, key)) for key in groups}


def _hash_file(path: Path, size: int) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        if size <= WHOLE_FILE:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(fh.read(1 << 20))
            fh.seek(size - (1 << 20))
            h.update(fh.read(1 << 20))
    return f"{size}:{h.hexdigest()}"


class Digests:
    """File digests remembered by (path, size, mtime, inode) in $FORGE_CACHE/file_digests.json, so
    that planning a recipe over a large local corpus reads each file once, not on every command
    (a file changed in place gets a new mtime, hence a new digest). Bounded to MAX entries."""

    MAX = 200_000

    def __init__(self) -> None:
        from forge.engine.tiny_model import default_cache_dir

        self.path = default_cache_dir() / "file_digests.json"
        try:
            self.known: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.added = 0

    def get(self, path: Path) -> str:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        if key not in self.known:
            self.known[key] = _hash_file(path, st.st_size)
            self.added += 1
        return self.known[key]

    def save(self) -> None:
        """Write them back when new ones were computed (never on a plan that hashed nothing new)."""
        if not self.added:
            return
        items = list(self.known.items())[-self.MAX :]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(dict(items)))
            os.replace(tmp, self.path)
        except OSError:  # a read-only cache: digests are computed again next time
            pass


def dataset_identity(name: str, revision: str | None = None) -> dict[str, Any]:
    """A dataset's identity: its local files' sizes and hashes, a remote dataset's objects' sizes
    and ETags, or a Hub id and revision."""
    if is_remote(name):
        from forge.storage.inputs import remote_identity

        return remote_identity(name)
    path = Path(name).expanduser()
    if name.startswith("forge://"):
        from forge.io.dataset import bundled

        path = bundled(name.split("://", 1)[1])
        path = path if path.exists() else path.with_suffix("")
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.endswith(".lock"))
    else:
        files = [Path(p) for p in sorted(glob.glob(os.path.expanduser(name))) if Path(p).is_file()]
        if not files:
            return {"hub": name, "revision": revision}
    base = files[0].parent if len(files) == 1 else Path(os.path.commonpath([str(f) for f in files]))
    digests = Digests()
    identity = {"files": {str(f.relative_to(base)): digests.get(f) for f in files}}
    digests.save()
    return identity


def fingerprint(settings: dict[str, Any], inputs: dict[str, Any]) -> str:
    """16 hex digits of sha256 over the settings and the inputs' identities."""
    payload = json.dumps({"format": FORMAT, "settings": settings, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"dedup.minhash.threshold": 0.7, ...}: the leaves of a settings tree (lists are leaves)."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def changes(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> str:
    """`dedup.minhash.threshold 0.7 -> 0.5` for each changed leaf (at most `limit`, then a count)."""
    a, b = flat(old), flat(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]
    shown = [
        f"{k} {json.dumps(a.get(k, '<unset>'), default=str)} -> {json.dumps(b.get(k, '<unset>'), default=str)}"
        for k in keys[:limit]
    ]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more
