"""Reading a weighted mix of sources (conf/dataset `sources:`), or one dataset, as one row stream.

Each source i gets the share p_i ∝ weight_i^(1/temperature) of `target_rows` (or of
`target_tokens`, counted as characters / 4 over a sample of its rows). A source with n_i rows that
must give r_i = target_i / n_i rows per row keeps each row floor(r_i) times, plus once more when
a hash of (seed, source, row) falls under the fraction: deterministic for a seed, streaming (no
source is held in memory), and exact in expectation. Without a target every row is read once.
Rows are numbered over the whole stream; row g belongs to shard g % tasks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from forge.config import DatasetConfig, SourceSpec
from forge.io.dataset import DatasetError, Source, SourceRow, file_identity, open_binary
from forge.schema import ConfigError
from forge.storage.fs import is_remote

log = logging.getLogger("forge.io.mix")
CHARS_PER_TOKEN = 4
TOKEN_SAMPLE_ROWS = 1000
_UNIT = float(1 << 64)


@dataclass
class MixSource:
    """One source as the mix reads it: its spec, its reader and how many rows it gives."""

    index: int
    spec: SourceSpec
    key: str  # dataset.sources[i], for messages
    reader: Source
    share: float = 1.0  # requested share p_i
    available: int | None = None  # rows it has (after max_rows); None = not counted (no target)
    rate: float = 1.0  # rows taken per row read (r_i)
    target: float = 0.0  # rows wanted from this source (kept rows, once a pass rate is known)
    pass_rate: float = 1.0  # share of its rows the stage keeps, measured on its first rows
    capped: int | None = None  # kept rows expected when max_repeat bounds the rate (short of target)

    @property
    def label(self) -> str:
        return self.spec.label or self.spec.name


@dataclass
class MixedRow:
    """A row of the stream: its number in the whole stream, its source, and which copy it is
    (0, or k > 0 for the k-th repeat of an up-sampled row)."""

    index: int
    source: int
    row: SourceRow
    copy: int = 0


@dataclass
class Mix:
    sources: list[MixSource]
    seed: int = 0
    targeted: bool = False
    requested: dict[str, float] = field(default_factory=dict)
    target_tokens: int | None = None  # the target counts tokens (characters / 4), not rows

    def describe(self) -> dict[str, Any]:
        """What identifies this input (the run fingerprint and the card)."""
        return {
            "sources": [
                {
                    "label": s.label,
                    "name": s.spec.name,
                    "config": s.spec.config,
                    "split": s.spec.split,
                    "revision": s.spec.revision,
                    "weight": s.spec.weight,
                    "max_rows": s.spec.max_rows,
                    "format": s.spec.format,
                    "columns": dict(s.spec.columns),
                    "meta": _plain(s.spec.meta),
                    "files": [Path(f).name for f in s.reader.files][:50],
                }
                | ({"unfinished": True} if s.reader.unfinished else {})
                for s in self.sources
            ],
            "seed": self.seed,
            "targeted": self.targeted,
            "target_tokens": self.target_tokens,
            "requested_share": self.requested,
        }

    def rows(self, task: int = 0, tasks: int = 1, done: int = 0) -> Iterator[MixedRow]:
        """The rows of shard `task`, in stream order (the same order on every run), after the
        first `done` of them (a resume). A single source read once as it is skips them without
        reading them where its format allows; any other mix reads through them."""
        if done and len(self.sources) == 1 and self.sources[0].rate == 1.0 and self.sources[0].spec.max_rows is None:
            src = self.sources[0]
            for row in src.reader.rows(task, tasks, skip=task + done * tasks):
                yield MixedRow(row.index, src.index, row)
            return
        taken = 0
        for row in self._rows(task, tasks):
            if taken >= done:
                yield row
            taken += 1

    def _rows(self, task: int, tasks: int) -> Iterator[MixedRow]:
        index = 0
        for src in self.sources:
            whole, frac = int(src.rate), src.rate - int(src.rate)
            for n, row in enumerate(src.reader.rows()):
                if src.spec.max_rows is not None and n >= src.spec.max_rows:
                    break
                copies = whole
                if frac and _uniform(self.seed, src.index, n) < frac:
                    copies += 1
                for copy in range(copies):
                    if index % tasks == task:
                        yield MixedRow(index, src.index, row, copy)
                    index += 1


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _uniform(seed: int, source: int, row: int) -> float:
    return xxhash.xxh64_intdigest(f"{seed}:{source}:{row}".encode()) / _UNIT


def source_specs(d: DatasetConfig) -> list[tuple[str, SourceSpec]]:
    """The sources of a mix, or the single dataset as a one-source mix, with their config keys."""
    if d.sources:
        return [(f"dataset.sources[{i}]", s) for i, s in enumerate(d.sources)]
    single = SourceSpec(
        name=d.name,
        config=d.config,
        split=d.split,
        revision=d.revision,
        max_rows=d.max_examples,
        format="text" if d.text_column and d.format == "auto" else d.format,
        columns={**d.columns, **({"text": d.text_column} if d.text_column else {})},
        meta=dict(d.meta),
    )
    return [("dataset", single)]


def check_mix(d: DatasetConfig) -> None:
    """Config mistakes of a mix, each naming the key."""
    labels: dict[str, str] = {}
    for key, spec in source_specs(d):
        if not spec.name or spec.name == "???":
            raise ConfigError(f"{key}.name: required")
        if spec.weight is None or not spec.weight > 0:
            raise ConfigError(f"{key}.weight: must be > 0 (got {spec.weight})")
        if spec.max_rows is not None and spec.max_rows < 0:
            raise ConfigError(f"{key}.max_rows: must be >= 0 (got {spec.max_rows})")
        label = spec.label or spec.name
        if label in labels:
            raise ConfigError(f"{key}.label: {label!r} is also the label of {labels[label]}; labels must be unique")
        labels[label] = key
    if d.sources and sum(s.weight for s in d.sources) <= 0:
        raise ConfigError("dataset.sources: the weights sum to 0")
    if d.max_repeat is None or not d.max_repeat >= 1:
        raise ConfigError(f"dataset.max_repeat: must be >= 1 (got {d.max_repeat})")
    if d.temperature is None or not d.temperature > 0:
        raise ConfigError(f"dataset.temperature: must be > 0 (got {d.temperature})")
    if d.target_rows is not None and d.target_tokens is not None:
        raise ConfigError("dataset.target_rows / target_tokens: set one of them, not both")
    for key in ("target_rows", "target_tokens"):
        value = getattr(d, key)
        if value is not None and value <= 0:
            raise ConfigError(f"dataset.{key}: must be > 0 (got {value})")


def open_mix(d: DatasetConfig) -> Mix:
    """Open every source (a missing file or Hub dataset fails here, naming the source) and size
    the mix: with a target, each source is counted once to know how often to take its rows."""
    check_mix(d)
    sources = []
    for i, (key, spec) in enumerate(source_specs(d)):
        reader_cfg = DatasetConfig(
            name=spec.name,
            config=spec.config,
            split=spec.split,
            revision=spec.revision,
            streaming=d.streaming,
            allow_unfinished=d.allow_unfinished,
        )
        try:
            reader = Source(reader_cfg, all_columns=True)
        except DatasetError as exc:
            raise DatasetError(f"{key} ({spec.label or spec.name}): {exc}") from None
        sources.append(MixSource(i, spec, key, reader))
    # in log space: weight^(1/T) overflows for a small T (T -> 0 gives the heaviest source it all)
    logs = [math.log(s.spec.weight) / d.temperature for s in sources]
    top = max(logs)
    powered = [math.exp(v - top) for v in logs]
    total = sum(powered)
    for s, p in zip(sources, powered, strict=True):
        s.share = p / total
    mix = Mix(sources, d.seed, targeted=d.target_rows is not None or d.target_tokens is not None)
    mix.requested = {s.label: round(s.share, 6) for s in sources}
    mix.target_tokens = d.target_tokens
    if mix.targeted:
        for s in sources:
            s.available, tokens_per_row = _measure(s)
            target = (
                d.target_rows * s.share if d.target_rows is not None else d.target_tokens * s.share / tokens_per_row
            )
            if not s.available:
                raise DatasetError(f"{s.key} ({s.label}): has no rows, but the mix gives it a share of {s.share:.1%}")
            s.target = target
            s.rate = target / s.available
    return mix


MIN_PASS_RATE = 0.01


def aim_at_kept_rows(mix: Mix, pilot: dict[int, tuple[float, float]], max_repeat: float = 10.0) -> None:
    """Size each source for the rows the stage will KEEP, from (pass rate, tokens per kept row)
    measured on its first rows: a source whose rows are filtered out twice as often is read twice
    as much, and with target_tokens the tokens counted are those of the kept, normalized rows.

    A source whose pilot keeps nothing is read once, no more (no repeat factor can give it a
    share; every row's reason lands in rejected/ once), with one warning naming it. One thinned out
    so much that reaching its share would repeat its rows more than `max_repeat` times (or than
    its share alone asks) is read that often and no more, with a warning. Either way stats.json
    (`short_of_share`) and the card show the share it achieved."""
    for s in mix.sources:
        if s.index in pilot and s.available:
            rate, tokens_per_row = pilot[s.index]
            if rate <= 0:
                s.pass_rate, s.rate, s.capped = 0.0, min(1.0, s.rate), 0  # never more than once over
                log.warning(
                    "%s (%s): the stage keeps none of this source's first rows (the pilot), so it cannot give its "
                    "share of %.1f%%; its rows are read once, each reason in rejected/, and the mix is short of it",
                    s.key,
                    s.label,
                    100 * s.share,
                )
                continue
            s.pass_rate = max(rate, MIN_PASS_RATE)
            if mix.target_tokens is not None and tokens_per_row > 0:
                s.target = mix.target_tokens * s.share / tokens_per_row
            wanted = s.target / (s.available * s.pass_rate)
            bound = max(max_repeat, s.target / s.available)  # a share alone may ask for more
            s.rate = min(wanted, bound)
            if wanted > bound:
                s.capped = round(s.rate * s.available * s.pass_rate)
                log.warning(
                    "mix: %s keeps %.0f%% of its rows in the pilot: about %d kept rows of the %.0f its share asks "
                    "for, read x%.2f (dataset.max_repeat=%g); its achieved share is in stats.json and the card",
                    s.label,
                    100 * rate,
                    s.capped,
                    s.target,
                    s.rate,
                    max_repeat,
                )
    for s in mix.sources:
        if s.rate > 1:
            log.info("mix: %s is up-sampled x%.2f (%d rows for %.0f kept)", s.label, s.rate, s.available, s.target)


def _hub_size(s: MixSource) -> tuple[int, float] | None:
    """A Hub source's rows and bytes per row from its published split sizes (the dataset card's
    metadata), so a mix of large Hub datasets is sized without reading them; None when unknown."""
    try:
        import datasets

        info = datasets.load_dataset_builder(s.spec.name, s.spec.config, revision=s.spec.revision).info
        split = (info.splits or {}).get(s.spec.split)
        if split is None or not split.num_examples:
            return None
        rows = int(split.num_examples)
        per_row = (split.num_bytes or 0) / rows / CHARS_PER_TOKEN
        return rows, max(per_row, 1.0)
    except Exception:  # offline, gated, no metadata: the caller counts rows instead
        return None


def _measure(s: MixSource) -> tuple[int, float]:
    """Rows the source gives, and its mean tokens per row (characters / 4 over a sample)."""
    if s.reader.hub:
        sized = _hub_size(s)
        if sized is not None:
            rows, per_row = sized
            return (rows if s.spec.max_rows is None else min(rows, s.spec.max_rows)), per_row
    n, chars = 0, 0
    for row in s.reader.rows():
        if s.spec.max_rows is not None and n >= s.spec.max_rows:
            break
        if n < TOKEN_SAMPLE_ROWS and row.record is not None:
            chars += sum(len(v) if isinstance(v, str) else len(str(v)) for v in row.record.values())
        n += 1
    sampled = min(n, TOKEN_SAMPLE_ROWS)
    return n, max(chars / max(sampled, 1) / CHARS_PER_TOKEN, 1.0)


def quick_count(reader: Source) -> int | None:
    """Rows of a local source without parsing them (Parquet metadata, lines of a text file), for
    the progress bar's total; None when that would mean reading it (Hub, gzip, JSON arrays)."""
    import pyarrow.parquet as pq

    if not reader.files:
        return None
    n = 0
    for f in reader.files:
        try:
            if f.endswith(".parquet"):
                with open_binary(f) as fh:  # a remote file: its footer only
                    n += pq.ParquetFile(fh).metadata.num_rows
            elif is_remote(f):
                return None  # counting lines would mean downloading it
            elif f.endswith((".jsonl", ".ndjson", ".csv", ".tsv")):
                with open(f, "rb") as fh:
                    lines = sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 24), b""))
                    fh.seek(max(fh.tell() - 1, 0))
                    lines += 1 if fh.tell() and fh.read(1) != b"\n" else 0
                n += lines - (1 if f.endswith((".csv", ".tsv")) else 0)
            else:
                return None
        except OSError:
            return None
    return n


def expected_rows(mix: Mix) -> int | None:
    """Rows the whole stream will have (about, for a sampled mix); None when unknown."""
    total = 0.0
    for s in mix.sources:
        if s.available is not None:
            total += s.available * s.rate
            continue
        n = quick_count(s.reader)
        if n is None:
            return None
        total += n if s.spec.max_rows is None else min(n, s.spec.max_rows)
    return round(total)


def input_fingerprint(mix: Mix) -> list[list[Any]]:
    """Each local file's name, size and a hash of its first MiB: a file changed under a run dir
    that holds rows must not be resumed as if it were the same."""
    out = []
    for s in mix.sources:
        for f in s.reader.files:
            out.append([s.label, Path(f).name, *file_identity(f)])
    return out
