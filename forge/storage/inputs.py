"""Which files a remote dataset.name means: one object, a prefix (directory), a glob, a forge run
dir on a store (its data/ chunks, refused while unfinished), or a Hub dataset read as files
(dataset.streaming). Every failure is one line naming the URL, before anything is written."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from forge.storage.fs import StorageError, check_url, explain, filesystem, join, retrying
from forge.storage.lease import live_holders

log = logging.getLogger("forge.storage.inputs")
REMOTE_BLOCK = 8 << 20  # bytes per remote read: few round trips, bounded memory


class InputError(ValueError):
    """A remote input that cannot be read as configured; forge/io/dataset.py raises it as its
    DatasetError (the message names the key and the URL)."""


def _dataset_error(message: str) -> InputError:
    return InputError(message)


def remote_files(url: str, suffixes: tuple[str, ...], suffix: Callable[[str], str]) -> tuple[list[str], str | None]:
    """(the data files of `url` as full URLs, in order; why it is an unfinished forge run dir or
    None)."""
    try:
        check_url(url, "dataset.name")
    except StorageError as exc:
        raise InputError(str(exc)) from None
    fs, path = filesystem(url)
    full = fs.unstrip_protocol

    def data(paths: list[str]) -> list[str]:
        return sorted(full(p) for p in paths if suffix(p) in suffixes and not os.path.basename(p).startswith("."))

    try:
        if any(ch in path for ch in "*?["):
            files = data(retrying(url, "list it", lambda: fs.glob(path)))
            if not files:
                raise _dataset_error(f"dataset.name: the pattern {url!r} matches no data files")
            return files, None
        info = retrying(url, "read it", lambda: fs.info(path), (FileNotFoundError,))
        if info.get("type") != "directory":
            if suffix(path) not in suffixes:
                raise _dataset_error(f"dataset.name: {url} is not one of {', '.join(suffixes)}")
            return [full(path)], None
        if retrying(url, "read it", lambda: fs.exists(join(path, "forge_run.json"))):
            files = data(retrying(url, "list its chunks", lambda: fs.glob(join(path, "data", "*.parquet"))))
            if not files:
                raise _dataset_error(f"dataset.name: the forge run dir {url} has no rows in data/ yet")
            return files, unfinished_reason(url)
        files = data(list(retrying(url, "list it", lambda: fs.find(path))))
        if not files:
            raise _dataset_error(f"dataset.name: {url} holds no data files")
        return files, None
    except FileNotFoundError:
        raise _dataset_error(f"dataset.name: {url}: no such bucket, object or prefix") from None
    except StorageError as exc:
        raise _dataset_error(f"dataset.name: {exc}") from None
    except InputError:
        raise
    except (OSError, ValueError) as exc:
        raise _dataset_error(f"dataset.name: {explain(url, exc, 'read it')}") from None


def remote_identity(url: str) -> dict[str, Any]:
    """What identifies a remote input without downloading it: each object's size and ETag (a
    recipe re-runs the steps that read it once either changes)."""
    fs, path = filesystem(url)
    try:
        if any(ch in path for ch in "*?["):
            found = retrying(url, "list it", lambda: fs.glob(path, detail=True))
        else:
            found = retrying(url, "list it", lambda: fs.find(path, detail=True, withdirs=False))
            if not found:
                found = {path: retrying(url, "read it", lambda: fs.info(path))}
    except (FileNotFoundError, StorageError) as exc:
        return {"remote": url, "unreadable": str(exc)}
    tags = ("ETag", "etag", "md5Hash", "blob_id", "LastModified", "mtime")
    files = {}
    for name, info in sorted(found.items()):
        if info.get("type", "file") == "file" and "/state/" not in name and not name.endswith((".lock", ".lease")):
            files[name] = [info.get("size"), next((str(info[k]) for k in tags if info.get(k)), None)]
    return {"remote": url, "files": files}


def unfinished_reason(url: str) -> str | None:
    """Why a forge run dir on a store is not a whole input (None when it is)."""
    holders = live_holders(url)
    if holders:
        return f"is being written right now by {holders[0]}"
    fs, path = filesystem(url)
    if retrying(url, "read it", lambda: fs.exists(join(path, "state", "started.json"))):
        return "is not finished (its last run was killed, failed or is not finalized: no state/finished.json)"
    if not retrying(url, "read it", lambda: fs.exists(join(path, "state", "finished.json"))):
        return "is not finished (its last run was killed, failed or is not finalized: no state/finished.json)"
    return None


def streamed_hub_files(
    name: str,
    config: str | None,
    split: str,
    revision: str | None,
    suffixes: tuple[str, ...],
    suffix: Callable[[str], str],
) -> list[str]:
    """The files of Hub dataset `name` that hold `split` (of `config`), as hf:// URLs, found the
    way datasets finds a dataset's data files (its README's configs, else its file-name patterns)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    rev = f"@{revision}" if revision else ""
    base = f"hf://datasets/{name}{rev}"
    try:
        configured = _configured_patterns(base, config)
        root = base if configured or not config else join(base, config)
        files = DataFilesDict.from_patterns(configured or get_data_patterns(root), base_path=root)
    except FileNotFoundError as exc:
        raise _dataset_error(f"dataset.name: {name}: no Hub dataset or no data files found ({exc})") from None
    except Exception as exc:  # datasets and huggingface_hub raise many types; one line, naming it
        raise _dataset_error(f"dataset.name: {explain(base, exc, 'read it')}") from None
    if split not in files:
        raise _dataset_error(f"dataset.split: {split!r} not in {name}; splits: {', '.join(files)}")
    chosen = [str(f) for f in files[split] if suffix(str(f)) in suffixes]
    if not chosen:
        raise _dataset_error(f"dataset.name: {name} split {split!r} has no files forge reads ({', '.join(suffixes)})")
    log.info("dataset.streaming: %s %s: %d file(s), read as the stage goes", name, split, len(chosen))
    return chosen


def _configured_patterns(base: str, config: str | None) -> dict[str, list[str]] | None:
    """The `configs:` of a dataset's README front matter (datasets' own convention), if any."""
    import yaml

    fs, path = filesystem(base)
    try:
        text = fs.cat_file(join(path, "README.md")).decode("utf-8", "replace")
    except (FileNotFoundError, OSError):
        return None
    if not text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except (yaml.YAMLError, IndexError):
        return None
    for entry in meta.get("configs") or []:
        if not isinstance(entry, dict):
            continue
        if (
            (config and entry.get("config_name") == config)
            or (not config and entry.get("default"))
            or (not config and entry.get("config_name") == "default")
        ):
            files = entry.get("data_files")
            if isinstance(files, str):
                return {"train": [files]}
            if isinstance(files, list):
                out: dict[str, list[str]] = {}
                for item in files:
                    if isinstance(item, dict):
                        paths = item.get("path")
                        out[str(item.get("split", "train"))] = [paths] if isinstance(paths, str) else list(paths or [])
                    else:
                        out.setdefault("train", []).append(str(item))
                return out
    return None


__all__ = ["REMOTE_BLOCK", "filesystem", "remote_files", "remote_identity", "streamed_hub_files", "unfinished_reason"]
