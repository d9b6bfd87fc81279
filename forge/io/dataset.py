"""Reading documents: a Hub dataset or local parquet/jsonl/json/csv/arrow files, globs and
`save_to_disk` directories. Config: conf/dataset.

Rows stream (nothing is held in memory) and carry their position, so a task reads only its
shard (position % tasks). A row that cannot be parsed (bad JSON line, bad encoding, a CSV line
with more or fewer fields than the header) becomes a row with an `error`, to be quarantined with
its file and line, never dropped or fatal. A compressed file that breaks off (truncated .jsonl.gz)
is read up to the break, which becomes one error row.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import gzip
import io
import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import xxhash

from forge.config import DatasetConfig
from forge.storage.fs import is_remote
from forge.storage.inputs import REMOTE_BLOCK, InputError, filesystem, remote_files, streamed_hub_files
from forge.storage.readahead import read_ahead

log = logging.getLogger("forge.io.dataset")

SAMPLE_PREFIX = "forge://"
FILE_SUFFIXES = (".parquet", ".jsonl", ".json", ".ndjson", ".csv", ".tsv", ".arrow", ".jsonl.gz", ".json.gz")
# what gzip raises on a truncated or damaged stream (gzip.BadGzipFile is an OSError)
GZIP_ERRORS = (EOFError, zlib.error, OSError)
# csv's default field limit (128 KiB) would refuse a whole file over one long document
CSV_FIELD_LIMIT = 1 << 30
_NOT_PARSED = object()


class DatasetError(ValueError):
    """The dataset cannot be read as configured; the message names the key or file."""


@dataclass
class SourceRow:
    index: int
    record: dict[str, Any] | None
    where: str  # file:line or split:row, for error messages
    error: str | None = None


def _looks_like_hub_id(name: str) -> bool:
    """`owner/name` (or `name`) that is no local path: what datasets.load_dataset reads."""
    return (
        not name.startswith((SAMPLE_PREFIX, ".", "/", "~"))
        and not Path(name).exists()
        and not any(ch in name for ch in "*?[")
    )


def bundled(name: str) -> Path:
    return Path(__file__).resolve().parents[1] / "data" / (name + ".jsonl")


def _suffix(path: str) -> str:
    for suf in sorted(FILE_SUFFIXES, key=len, reverse=True):
        if path.endswith(suf):
            return suf
    return Path(path).suffix


def open_binary(path: str) -> Any:
    """A local file, or a remote one (s3://, gs://, hf://, https://...) read in large blocks."""
    if not is_remote(path):
        return open(path, "rb")
    fs, inner = filesystem(path)
    return fs.open(inner, "rb", block_size=REMOTE_BLOCK, cache_type="readahead")


def file_identity(path: str) -> tuple[int | None, str | None]:
    """(size, a hash of the first MiB) of a local file; (size, the store's ETag) of a remote one,
    so a changed input is noticed without downloading it. (None, None) when unreadable."""
    try:
        if is_remote(path):
            fs, inner = filesystem(path)
            info = fs.info(inner)
            keys = ("ETag", "etag", "md5Hash", "blob_id", "LastModified")
            tag = next((str(info[k]) for k in keys if info.get(k)), None)
            return info.get("size"), tag
        with open(path, "rb") as fh:
            head = xxhash.xxh64_hexdigest(fh.read(1 << 20))
        return Path(path).stat().st_size, head
    except (OSError, ValueError):
        return None, None


def _broken(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _read_json_lines(path: str) -> Iterator[tuple[dict[str, Any] | None, str, str | None]]:
    gz = path.endswith(".gz")
    with open_binary(path) as raw_fh, gzip.GzipFile(fileobj=raw_fh) if gz else contextlib.nullcontext(raw_fh) as fh:
        head = fh.read(1)  # a gzip file damaged from its first byte raises here: the run stops naming it
        while head and head.isspace():
            head = fh.read(1)
        fh.seek(0)
        if head == b"[":  # a JSON array file
            try:
                items = json.load(io.TextIOWrapper(fh, encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise DatasetError(f"{path}: not valid JSON: {exc}") from exc
            except GZIP_ERRORS as exc:
                if not gz:
                    raise
                raise DatasetError(
                    f"{path}: the file is truncated or corrupt ({_broken(exc)}); a JSON array cannot be read in part"
                ) from exc
            for i, item in enumerate(items):
                yield (
                    (item if isinstance(item, dict) else None),
                    f"{path}[{i}]",
                    (None if isinstance(item, dict) else f"item is {type(item).__name__}, not an object"),
                )
            return
        lines = iter(fh)
        lineno = 0
        while True:
            try:
                raw = next(lines)
                if gz and not raw.endswith(b"\n"):
                    # an unterminated last line counts only if the stream then ends cleanly
                    next(lines, None)
            except StopIteration:
                return
            except GZIP_ERRORS as exc:
                if not gz:
                    raise
                yield (
                    None,
                    f"{path}:{lineno + 1}",
                    f"file is truncated or corrupt from this line on ({_broken(exc)}); "
                    "the rest of the file could not be read",
                )
                return
            lineno += 1
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark
            try:
                item = orjson.loads(raw)
            except orjson.JSONDecodeError:  # stdlib json: NaN literals, and its precise error messages
                item = _NOT_PARSED
            try:
                if item is _NOT_PARSED:
                    item = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield None, where, f"line is not UTF-8: {exc.reason} at byte {exc.start}"
                continue
            except ValueError as exc:
                yield None, where, f"line is not valid JSON: {exc}"
                continue
            if not isinstance(item, dict):
                yield None, where, f"line holds a JSON {type(item).__name__}, not an object"
                continue
            yield item, where, None


def unfinished_reason(path: Path) -> str | None:
    """Why a forge run dir is not a whole input (None when it is): being written right now, or
    its last session never finished (killed, failed, or a Slurm run not finalized)."""
    from forge.run.locks import running_holder
    from forge.run.output import is_finished

    holder = running_holder(path)
    if holder is not None:
        return f"is being written right now by {holder}"
    if not is_finished(path):
        return "is not finished (its last run was killed, failed or is not finalized: no state/finished.json)"
    return None


def is_run_dir(name: str) -> bool:
    """A directory forge wrote (a run of any stage): its rows are data/*.parquet."""
    path = Path(name)
    return path.is_dir() and (path / "forge_run.json").is_file() and (path / "data").is_dir()


def parquet_row_groups(path: str) -> list[int]:
    """The rows of each row group of a Parquet file, from its footer (one small read remotely)."""
    import pyarrow.parquet as pq

    with open_binary(path) as fh:
        meta = pq.ParquetFile(fh).metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def _read_parquet(path: str, columns: list[str], first_group: int = 0) -> Iterator[tuple[dict[str, Any], str, None]]:
    """Rows of a Parquet file, from row group `first_group` on (a resume skips whole groups)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(open_binary(path) if is_remote(path) else path)
    names = pf.schema_arrow.names
    _require_columns(path, names, columns)
    row = sum(pf.metadata.row_group(i).num_rows for i in range(first_group))
    groups = list(range(first_group, pf.metadata.num_row_groups))
    wanted = [c for c in columns if c in names] if columns else None
    for batch in pf.iter_batches(batch_size=4096, row_groups=groups, columns=wanted):
        for item in batch.to_pylist():
            yield item, f"{path}:row {row}", None
            row += 1


def _read_arrow(path: str, columns: list[str]) -> Iterator[tuple[dict[str, Any], str, None]]:
    import pyarrow as pa

    with open_binary(path) as fh:
        try:
            reader = pa.ipc.open_file(fh)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            schema = reader.schema
        except pa.ArrowInvalid:
            fh.seek(0)
            reader = pa.ipc.open_stream(fh)
            batches = iter(reader)
            schema = reader.schema
        _require_columns(path, schema.names, columns)
        row = 0
        for batch in batches:
            for item in (batch.select([c for c in columns if c in schema.names]) if columns else batch).to_pylist():
                yield item, f"{path}:row {row}", None
                row += 1


def _read_csv(path: str, columns: list[str]) -> Iterator[tuple[dict[str, Any] | None, str, str | None]]:
    """Rows by header name; a line with more or fewer fields than the header is an error row
    (csv.DictReader would drop the extra fields, or fill the missing ones with None)."""
    delimiter = "\t" if path.endswith(".tsv") else ","
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    with (
        open_binary(path) as raw_fh,
        io.TextIOWrapper(raw_fh, encoding="utf-8-sig", errors="strict", newline="") as fh,
    ):
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            names = next(reader, None) or []
            _require_columns(path, names, columns)
            for fields in reader:
                if not fields:
                    continue  # a blank line
                where = f"{path}:line {reader.line_num}"
                if len(fields) != len(names):
                    plural = "s" if len(fields) != 1 else ""
                    yield None, where, f"line has {len(fields)} field{plural}; the header has {len(names)}"
                    continue
                yield dict(zip(names, fields, strict=True)), where, None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DatasetError(f"{path}: unreadable CSV near line {reader.line_num}: {exc}") from exc


def _require_columns(where: str, names: list[str], columns: list[str]) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        raise DatasetError(
            f"{where}: no column {missing[0]!r} (dataset.prompt_column / id_column / keep_columns); "
            f"columns are: {', '.join(map(str, names))}"
        )


class Source:
    """A dataset as configured: an ordered stream of rows, shardable by position."""

    def __init__(self, cfg: DatasetConfig, all_columns: bool = False) -> None:
        """all_columns: read every column (a stage that maps columns itself, such as curate),
        instead of the prompt, id and keep columns."""
        self.cfg = cfg
        self.all_columns = all_columns
        self.columns = [cfg.prompt_column] + ([cfg.id_column] if cfg.id_column else []) + list(cfg.keep_columns)
        if all_columns:
            self.columns = []
        self.files: list[str] = []
        self.hub = False
        self.unfinished: str | None = None  # why a forge run dir read as input is not finished
        name = cfg.name
        self.remote = is_remote(name) or (cfg.streaming and _looks_like_hub_id(name))
        if self.remote:
            try:
                self._find_remote(name)
            except InputError as exc:
                raise DatasetError(str(exc)) from None
        elif name.startswith(SAMPLE_PREFIX):
            path = bundled(name[len(SAMPLE_PREFIX) :])
            if not path.exists():
                raise DatasetError(f"dataset.name: no bundled dataset {name!r}")
            self.files = [str(path)]
        elif any(ch in name for ch in "*?["):
            self.files = sorted(p for p in glob.glob(name, recursive=True) if _suffix(p) in FILE_SUFFIXES)
            if not self.files:
                raise DatasetError(f"dataset.name: the pattern {name!r} matches no data files")
        elif Path(name).is_file():
            if _suffix(name) not in FILE_SUFFIXES:
                raise DatasetError(f"dataset.name: {name} is not one of {', '.join(FILE_SUFFIXES)}")
            self.files = [name]
        elif is_run_dir(name):  # a forge run dir: the next stage reads what it wrote
            self.unfinished = unfinished_reason(Path(name))
            self._accept_unfinished(name)
            self.files = sorted(str(p) for p in (Path(name) / "data").glob("*.parquet"))
            if not self.files:
                raise DatasetError(f"dataset.name: the forge run dir {name} has no rows in data/ yet")
        elif Path(name).is_dir():
            if not (Path(name) / "dataset_info.json").exists() and not (Path(name) / "dataset_dict.json").exists():
                self.files = sorted(
                    str(p) for p in Path(name).rglob("*") if p.is_file() and _suffix(str(p)) in FILE_SUFFIXES
                )
                if not self.files:
                    raise DatasetError(f"dataset.name: directory {name} holds no data files")
        elif name.startswith((".", "/", "~")) or name.endswith(FILE_SUFFIXES):
            raise DatasetError(f"dataset.name: no such file or directory: {name}")
        else:
            self.hub = True

    def _accept_unfinished(self, name: str) -> None:
        """An unfinished forge run dir as input: refused, or read as it is (allow_unfinished)."""
        if self.unfinished and not self.cfg.allow_unfinished:
            raise DatasetError(
                f"dataset.name: the forge run dir {name} {self.unfinished}; finish it first (re-run the "
                "command that writes it), or set dataset.allow_unfinished=true to read the chunks it has"
            )
        if self.unfinished:
            log.warning("dataset.allow_unfinished: reading %s, which %s", name, self.unfinished)

    def _find_remote(self, name: str) -> None:
        """The files of a remote dataset.name, or of a Hub dataset read as it goes (streaming)."""
        cfg = self.cfg
        if is_remote(name):
            self.files, self.unfinished = remote_files(name, FILE_SUFFIXES, _suffix)
            self._accept_unfinished(name)
        elif self.remote:  # dataset.streaming: a Hub dataset read file by file, nothing downloaded first
            self.files = streamed_hub_files(name, cfg.config, cfg.split, cfg.revision, FILE_SUFFIXES, _suffix)

    def describe(self) -> dict[str, Any]:
        """What identifies this input, for the run fingerprint and the dataset card (not
        dataset.streaming: how it is read, not what)."""
        return {
            "name": self.cfg.name,
            "config": self.cfg.config,
            "split": self.cfg.split,
            "revision": self.cfg.revision,
            "prompt_column": self.cfg.prompt_column,
            "id_column": self.cfg.id_column,
            "max_examples": self.cfg.max_examples,
            "files": [str(Path(f).name) for f in self.files][:50],
        } | ({"unfinished": True} if self.unfinished else {})  # not the why: a pid would pin the run

    def _file_rows(self, path: str) -> Iterator[tuple[dict[str, Any] | None, str, str | None]]:
        suffix = _suffix(path)
        if suffix == ".parquet":
            return _read_parquet(path, self.columns)
        if suffix == ".arrow":
            return _read_arrow(path, self.columns)
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, self.columns)
        return _read_json_lines(path)

    def _hf_rows(self) -> Iterator[tuple[dict[str, Any], str, None]]:
        ds = self._load_hf()
        _require_columns(f"dataset {self.cfg.name}", list(ds.column_names), self.columns)
        columns = self.columns or list(ds.column_names)
        ds = ds.select_columns(columns)
        for start in range(0, len(ds), 4096):
            batch = ds[start : start + 4096]
            for i in range(len(batch[columns[0]])):
                yield {c: batch[c][i] for c in columns}, f"{self.cfg.split}:row {start + i}", None

    def _load_hf(self) -> Any:
        import datasets

        cfg = self.cfg
        try:
            if not self.hub:
                loaded = datasets.load_from_disk(cfg.name)
            else:
                loaded = datasets.load_dataset(cfg.name, cfg.config, split=cfg.split, revision=cfg.revision)
        except Exception as exc:  # datasets raises many types; the user needs the first line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise DatasetError(f"dataset.name: cannot load {cfg.name!r}: {first}") from exc
        if isinstance(loaded, datasets.DatasetDict):
            if cfg.split not in loaded:
                raise DatasetError(f"dataset.split: {cfg.split!r} not in {cfg.name}; splits: {', '.join(loaded)}")
            loaded = loaded[cfg.split]
        return loaded

    def _check_json_keys(self, path: str, probe: int = 1000) -> None:
        """JSON lines have no schema: if none of the first rows has the prompt (or id) key, the
        config is wrong; a few rows without it are bad rows, quarantined later."""
        wanted = [c for c in (self.cfg.prompt_column, self.cfg.id_column) if c]
        found: set[str] = set()
        seen: set[str] = set()
        for n, (record, _, _) in enumerate(_read_json_lines(path)):
            if record is not None:
                found.update(c for c in wanted if c in record)
                seen.update(map(str, record))
            if len(found) == len(wanted) or n >= probe:
                break
        for column, key in ((self.cfg.prompt_column, "prompt_column"), (self.cfg.id_column, "id_column")):
            if column and column not in found and seen:
                raise DatasetError(
                    f"{path}: no row has the key {column!r} (dataset.{key}); keys seen: {', '.join(sorted(seen))}"
                )

    def rows(self, task: int = 0, tasks: int = 1, skip: int = 0) -> Iterator[SourceRow]:
        """Rows of shard `task` of `tasks`, in source order, up to dataset.max_examples. Rows whose
        position is below `skip` are never yielded, and not even read where the format allows
        (a resume: whole Parquet files and row groups are passed over by their footers)."""
        limit = self.cfg.max_examples
        if self.files and not self.all_columns and _suffix(self.files[0]) not in (".parquet", ".arrow", ".csv", ".tsv"):
            try:
                self._check_json_keys(self.files[0])
            except (OSError, EOFError, zlib.error) as exc:  # e.g. a gzip file damaged from its first byte
                raise DatasetError(f"{self.files[0]}: cannot read: {exc}") from exc
        index = 0
        for path in self.files or [self.cfg.name]:
            try:
                if self.files and skip > index and _suffix(path) == ".parquet":
                    groups = parquet_row_groups(path)
                    first = 0
                    while first < len(groups) and index + groups[first] <= skip:
                        index += groups[first]
                        first += 1
                    if first == len(groups):
                        continue  # every row of this file is done
                    stream: Iterator = _read_parquet(path, self.columns, first)
                else:
                    stream = self._file_rows(path) if self.files else self._hf_rows()
                if self.remote:  # fetched and parsed in a thread while the stage works (bounded)
                    from forge.storage.fs import settings

                    stream = read_ahead(iter(stream), settings().read_ahead_rows)
                for record, where, error in stream:
                    if limit is not None and index >= limit:
                        return
                    if index >= skip and index % tasks == task:
                        yield SourceRow(index, record, where, error)
                    index += 1
            except DatasetError:
                raise
            except (OSError, ValueError, EOFError, zlib.error) as exc:  # corrupt parquet/arrow/gzip, unreadable file
                raise DatasetError(f"{path}: cannot read: {exc}") from exc
