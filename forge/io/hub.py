"""Publishing a run to the Hugging Face Hub as it goes (conf: `output.hub_repo`, `output.private`,
`output.hub_*` in conf/config.yaml; schema: OutputConfig).

Why it is shaped this way:
- One publisher per run, never one per task: the Hub limits commits per repo (about 128 an hour),
  so the local forge process (a background thread) or the Slurm monitor job batches every chunk
  finished since the last commit into one commit, at most `output.hub_commits_per_hour` an hour.
  The times of past commits are kept in state/hub.json, so kills and re-runs keep the pace too.
- A chunk's name on the Hub is its local name, `data/TTTTT_CCCCC.parquet` (task, chunk): a chunk
  keeps its name forever, and before its first commit a (re)started publisher lists the repo and
  skips every file already there with the same size and sha256. A commit that landed just before
  a kill is therefore never repeated, and no row reaches the Hub twice.
- 429 / 412 / 5xx and dropped connections are retried with backoff (Retry-After honoured).
- The token comes from HF_TOKEN or the saved login (huggingface_hub.get_token) and is only ever
  handed to huggingface_hub: it is masked in logs like every secret, never written anywhere.
  A missing, invalid or read-only token stops the run before any engine starts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from forge.io.secrets import register_secret_value
from forge.run.output import shard_files, write_json_atomic

log = logging.getLogger("forge.io.hub")
T = TypeVar("T")
RETRY_STATUS = {408, 412, 429, 500, 502, 503, 504}
HUB_COMMIT_LIMIT_PER_HOUR = 128  # the Hub's own limit per repo, roughly
STATE = "state/hub.json"


class HubError(RuntimeError):
    """Publishing cannot start or could not finish; the message says why and what to do."""


@dataclass
class HubTarget:
    repo: str
    private: bool = True
    commits_per_hour: int = 60
    max_retries: int = 8
    backoff_s: float = 2.0

    @property
    def spacing_s(self) -> float:
        """Seconds between two commits: at most commits_per_hour in any hour."""
        return 3600.0 / self.commits_per_hour


def target_from(output: Any) -> HubTarget | None:
    """The publishing settings of an OutputConfig (or of config.yaml's `output:` dict)."""
    get = output.get if isinstance(output, dict) else lambda k, d=None: getattr(output, k, d)
    if not get("hub_repo"):
        return None
    return HubTarget(
        repo=get("hub_repo"),
        private=bool(get("private", True)),
        commits_per_hour=int(get("hub_commits_per_hour", 60)),
        max_retries=int(get("hub_max_retries", 8)),
        backoff_s=float(get("hub_backoff_s", 2.0)),
    )


def _token_source() -> str:
    if os.environ.get("HF_TOKEN"):
        return "HF_TOKEN"
    if os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "HUGGING_FACE_HUB_TOKEN"
    return "the saved login (`hf auth login`)"


def _api() -> Any:
    from huggingface_hub import HfApi
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # per-file upload bars would flood forge's log; forge logs each commit

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)


def _status(exc: BaseException) -> int | None:
    """The HTTP status behind a huggingface_hub error (also when wrapped, e.g. an LFS upload)."""
    e: BaseException | None = exc
    while e is not None:
        response = getattr(e, "response", None)
        code = getattr(response, "status_code", None)
        if isinstance(code, int):
            return code
        e = e.__cause__
    return None


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _retryable(exc: BaseException) -> bool:
    status = _status(exc)
    if status is not None:
        return status in RETRY_STATUS
    name = type(exc).__name__
    return isinstance(exc, (ConnectionError, TimeoutError, OSError)) or "Timeout" in name or "Connect" in name


def with_retries(what: str, call: Callable[[], T], target: HubTarget, sleep: Callable[[float], None] = time.sleep) -> T:
    """call(), retried on 429 / 412 / 5xx / connection errors with exponential backoff and jitter."""
    for attempt in range(target.max_retries + 1):
        try:
            return call()
        except Exception as exc:
            if attempt >= target.max_retries or not _retryable(exc):
                raise
            wait = _retry_after(exc)
            if wait is None:
                wait = min(120.0, target.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
            log.warning(
                "hub: %s failed (%s); retry %d/%d in %.1f s",
                what,
                _status(exc) or type(exc).__name__,
                attempt + 1,
                target.max_retries,
                wait,
            )
            sleep(wait)
    raise AssertionError("unreachable")


def preflight(target: HubTarget) -> str:
    """Check the token can write target.repo and create the repo; returns the user name.
    Runs before any engine starts, so a token problem costs no GPU time."""
    from huggingface_hub import get_token

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise HubError(f"output.hub_repo={target.repo}: HF_HUB_OFFLINE is set, so nothing can be published; unset it")
    token = get_token()
    source = _token_source()
    if not token:
        raise HubError(
            f"output.hub_repo={target.repo}: no Hugging Face token found: set HF_TOKEN or log in with "
            "`hf auth login` (a token with write access), or drop output.hub_repo"
        )
    register_secret_value(token)
    api = _api()
    try:
        me = with_retries("whoami", lambda: api.whoami(token=token), target)
    except Exception as exc:
        if _status(exc) == 401:
            raise HubError(f"output.hub_repo={target.repo}: the token from {source} is invalid or expired") from None
        raise HubError(f"output.hub_repo={target.repo}: cannot reach the Hub at {api.endpoint}: {exc}") from None
    if not can_write(me, target.repo):
        role = me.get("auth", {}).get("accessToken", {}).get("role", "unknown")
        raise HubError(
            f"output.hub_repo={target.repo}: the token from {source} is read-only (role {role!r}); "
            "publishing needs a token with write access to that repo"
        )
    try:
        with_retries(
            "create_repo",
            lambda: api.create_repo(
                target.repo, repo_type="dataset", private=target.private, exist_ok=True, token=token
            ),
            target,
        )
    except Exception as exc:
        raise HubError(f"output.hub_repo={target.repo}: cannot create or open the dataset repo: {exc}") from None
    if target.commits_per_hour > HUB_COMMIT_LIMIT_PER_HOUR:
        log.warning(
            "hub: output.hub_commits_per_hour=%d is above the Hub's ~%d commits/hour per repo: expect 429s",
            target.commits_per_hour,
            HUB_COMMIT_LIMIT_PER_HOUR,
        )
    log.info("hub: publishing to dataset %s as %s (%s)", target.repo, me.get("name"), source)
    return str(me.get("name"))


def can_write(whoami: dict[str, Any], repo: str) -> bool:
    """Whether whoami's token may write `repo`: a write token, or a fine-grained one scoped to it."""
    access = whoami.get("auth", {}).get("accessToken", {})
    role = access.get("role")
    if role in ("write", "admin"):
        return True
    if role != "fineGrained":
        return False
    namespace = repo.split("/")[0]
    for scope in access.get("fineGrained", {}).get("scoped", []):
        entity = scope.get("entity", {})
        perms = set(scope.get("permissions", []))
        if "repo.write" not in perms:
            continue
        if entity.get("type") in ("user", "org") and entity.get("name") == namespace:
            return True
        if entity.get("type") == "dataset" and entity.get("name") == repo:
            return True
    return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def _locked(out_dir: Path):
    """One publisher at a time per run dir (the Slurm monitor's last sync may meet finalize's)."""
    path = out_dir / "state" / "hub.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class HubPublisher:
    """Uploads a run dir's finished chunks (and its card) to a dataset repo, batched and paced."""

    def __init__(self, out_dir: Path, target: HubTarget, sleep: Callable[[float], None] = time.sleep) -> None:
        self.out_dir = Path(out_dir)
        self.target = target
        self.sleep = sleep
        self.api = _api()
        self.state_path = self.out_dir / STATE
        self.state = self._load_state()
        self.reconciled = False

    @classmethod
    def for_run_dir(cls, out_dir: Path) -> HubPublisher | None:
        """The publisher configured in <run dir>/config.yaml, if any (Slurm monitor / finalize)."""
        path = Path(out_dir) / "config.yaml"
        if not path.exists():
            return None
        target = target_from((yaml.safe_load(path.read_text()) or {}).get("output", {}))
        return cls(Path(out_dir), target) if target else None

    def _load_state(self) -> dict[str, Any]:
        if self.state_path.exists():
            state = json.loads(self.state_path.read_text())
            if state.get("repo") == self.target.repo:
                return state
        return {"repo": self.target.repo, "commits": [], "uploaded": {}}

    def _save_state(self) -> None:
        write_json_atomic(self.state_path, self.state)

    def local_files(self) -> dict[str, Path]:
        """path in repo -> local file, for every finished chunk (shards are renamed into place whole)."""
        files = {}
        pools = self.out_dir / "pools"  # a curate run's pools: pools/<name>/TTTTT_CCCCC.parquet
        subs = ["data", "rejected"]
        if pools.is_dir():
            subs += [f"pools/{p.name}" for p in sorted(pools.iterdir()) if p.is_dir()]
        for sub in subs:
            for path in shard_files(self.out_dir / sub):
                files[f"{sub}/{path.name}"] = path
        return files

    def reconcile(self) -> None:
        """Mark chunks already in the repo (same size and sha256) as uploaded: a commit that landed
        just before a kill is not made again."""
        remote: dict[str, tuple[int, str | None]] = {}
        entries = with_retries(
            "list files",
            lambda: list(self.api.list_repo_tree(self.target.repo, repo_type="dataset", recursive=True)),
            self.target,
        )
        for entry in entries:
            size = getattr(entry, "size", None)
            if size is None:
                continue  # a folder
            lfs = getattr(entry, "lfs", None)
            sha = getattr(lfs, "sha256", None) if lfs is not None else None
            remote[entry.path] = (int(size), sha)
        uploaded = {}
        for name, path in self.local_files().items():
            if name not in remote:
                continue
            sha = _sha256(path)
            size, remote_sha = remote[name]
            if size == path.stat().st_size and remote_sha in (None, sha):
                uploaded[name] = {"size": size, "sha256": sha}
        self.state["uploaded"] = uploaded
        # the pace survives a lost state file too: the repo's newest commit counts as one of ours
        commits = with_retries(
            "list commits", lambda: self.api.list_repo_commits(self.target.repo, repo_type="dataset"), self.target
        )
        newest = max((c.created_at.timestamp() for c in commits), default=None)
        if newest is not None and (not self.state["commits"] or newest > self.state["commits"][-1]):
            self.state["commits"].append(newest)
        self._save_state()  # sync() reloads the state file: keep what the listing found
        self.reconciled = True

    def pending(self) -> dict[str, Path]:
        done = self.state["uploaded"]
        return {
            name: path
            for name, path in self.local_files().items()
            if name not in done or done[name]["size"] != path.stat().st_size
        }

    def next_commit_at(self) -> float:
        """Wall-clock time of the next allowed commit: spaced by 3600 / commits_per_hour."""
        commits = self.state["commits"]
        return commits[-1] + self.target.spacing_s if commits else 0.0

    def sync(self, card: str | None = None, extra: dict[str, Path] | None = None, wait: bool = True) -> int:
        """One commit of every pending chunk plus `card` (README.md) and `extra` files.
        Waits for the commit pace unless wait=False (then returns -1 when it is too early).
        Returns the number of chunks committed."""
        with _locked(self.out_dir):
            self.state = self._load_state()
            if not self.reconciled:
                self.reconcile()
            pending = self.pending()
            if not pending and card is None and not extra:
                return 0
            delay = self.next_commit_at() - time.time()
            if delay > 0:
                if not wait:
                    return -1
                log.info("hub: next commit in %.0f s (output.hub_commits_per_hour)", delay)
                self.sleep(delay)
            self._commit(pending, card, extra or {})
            return len(pending)

    def _commit(self, pending: dict[str, Path], card: str | None, extra: dict[str, Path]) -> None:
        from huggingface_hub import CommitOperationAdd

        ops = [CommitOperationAdd(name, str(path)) for name, path in sorted(pending.items())]
        ops += [CommitOperationAdd(name, str(path)) for name, path in sorted(extra.items())]
        if card is not None:
            ops.append(CommitOperationAdd("README.md", card.encode()))
        chunks = len(pending)
        message = f"forge: {chunks} chunk(s)" + (" + card" if card is not None else "")

        def commit() -> Any:
            return self.api.create_commit(
                self.target.repo, ops, commit_message=message, repo_type="dataset", num_threads=4
            )

        t0 = time.time()
        # written ahead: a kill during the commit still leaves its time, so the restart keeps the pace
        self.state["commits"] = [*self.state["commits"][-(HUB_COMMIT_LIMIT_PER_HOUR * 2) :], t0]
        self._save_state()
        with_retries("commit", commit, self.target, self.sleep)
        for name, path in pending.items():
            self.state["uploaded"][name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        self.state["commits"][-1] = time.time()
        self._save_state()
        log.info("hub: committed %s to %s in %.1f s", message, self.target.repo, time.time() - t0)


def repo_url(repo: str) -> str:
    from huggingface_hub import constants

    return f"{(os.environ.get('HF_ENDPOINT') or constants.ENDPOINT).rstrip('/')}/datasets/{repo}"


def final_files(out_dir: Path) -> dict[str, Path]:
    """What the last commit adds besides the chunks: stats, config, and the files a stage names
    in the registry (`published`: tokenize's token shards and index.json)."""
    import yaml

    from forge.stages.registry import DEFAULT_STAGE, spec

    files = {name: out_dir / name for name in ("stats.json", "config.yaml") if (out_dir / name).exists()}
    try:
        saved = yaml.safe_load((out_dir / "config.yaml").read_text()) or {}
        extra = spec((saved.get("pipeline") or {}).get("stage", DEFAULT_STAGE)).published
    except (OSError, KeyError, yaml.YAMLError):
        extra = ()
    for name in extra:
        path = out_dir / name
        found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        files.update({str(p.relative_to(out_dir)): p for p in found if not p.name.startswith(".")})
    return files


class BackgroundPublisher:
    """Locally: commits finished chunks and a refreshed progress card while the run goes on."""

    def __init__(self, publisher: HubPublisher) -> None:
        self.publisher = publisher
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="forge-hub", daemon=True)
        self.errors = 0

    def __enter__(self) -> BackgroundPublisher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=60)

    def _loop(self) -> None:
        p = self.publisher
        last_done = None
        while not self.stop_event.is_set():
            delay = max(p.next_commit_at() - time.time(), min(p.target.spacing_s, 30.0))
            if self.stop_event.wait(delay):
                return
            try:
                last_done = publish_progress(p, last_done)
            except Exception as exc:  # the run goes on; the final sync (or a re-run) uploads the rest
                self.errors += 1
                log.warning("hub: background upload failed (%s); will try again", exc)


def publish_progress(publisher: HubPublisher, last_done: int | None) -> int | None:
    """One paced commit of the chunks finished so far and the card's progress section, when either
    changed (a refreshed bar alone is worth a commit; an unchanged one is not). Returns the
    documents done as of this card, for the next call."""
    from forge.run.card import render_card
    from forge.run.progress import aggregate_progress

    if time.time() < publisher.next_commit_at():
        return last_done
    progress = aggregate_progress(publisher.out_dir)
    if not publisher.pending() and progress.get("done") == last_done:
        return last_done
    card = render_card(publisher.out_dir, publisher.target.repo, progress=progress)
    if publisher.sync(card=card, wait=False) < 0:
        return last_done
    return progress.get("done")


def publish_final(out_dir: Path, target: HubTarget) -> int:
    """The last commit of a finished run: the remaining chunks, stats.json, config.yaml, the card."""
    from forge.run.card import render_card

    publisher = HubPublisher(out_dir, target)
    try:
        return publisher.sync(card=render_card(out_dir, target.repo), extra=final_files(out_dir))
    except Exception as exc:
        raise HubError(
            f"upload to {target.repo} failed: {exc}. The run itself is complete in {out_dir}; "
            "re-run the same command to upload what is missing (nothing is uploaded twice)"
        ) from None
