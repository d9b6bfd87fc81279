"""The `decontaminate` curate filter: remove rows that share an n-gram with a benchmark's items.

The method of GPT-3 and datatrove: both sides are normalized (NFKC, case-folded, punctuation
dropped: words only), every n-gram of words (default 13) of each benchmark field is indexed, and
a row containing `min_overlap` of them is contaminated. A benchmark field shorter than n words
(an MMLU question) is indexed whole when it has at least `min_words` words, so short items are
found too. The removed row records the benchmark, the item's id and the matching n-gram.

Benchmarks are local files (.jsonl/.json/.parquet/.csv), names of the bundled configs
(conf/decontaminate/<name>.yaml: the Hub id, config, split and columns of common benchmark sets),
or Hub dataset ids read from the local Hugging Face cache: nothing is downloaded at run time.

The index (sorted uint64 n-gram hashes, with the benchmark and item of each) is built once per
benchmark set and cached under $FORGE_CACHE/decontaminate/, keyed by the files' content and the
settings: a second run, or another Slurm task, loads it in milliseconds.

Speed: datatrove splits each row into words with spaCy and hashes each n-gram's joined string in
Python; here words are one regex, each word is hashed once, and every n-gram hash of a row is a
polynomial roll of n vector operations, looked up with one `searchsorted`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
import yaml

from forge.stages.curate.filters import RowFilter
from forge.stages.curate.rows import Removal

log = logging.getLogger("forge.stages.curate")
WORD = re.compile(r"[^\W_]+")  # letters and digits: snake_case is two words
MARKS = re.compile(r"[\u0300-\u036f]")  # combining diacritics, after NFKD
INDEX_VERSION = 1
ROLL = np.uint64(0x9E3779B97F4A7C15)
TEXT_COLUMNS = (  # a benchmark's compared columns when `columns` is not given (the ones it has)
    *("question", "problem", "prompt", "query", "instruction", "input", "text", "context", "ctx", "passage"),
    *("messages", "answer", "solution", "response", "completion", "choices", "endings", "options"),
    *("canonical_solution", "target", "output", "rationale", "explanation"),
)
ID_COLUMNS = ("id", "task_id", "question_id", "unique_id", "problem_id", "ind", "idx")


class BenchmarkError(ValueError):
    """A benchmark that cannot be read: the message names it and what to do."""


def words_of(text: str) -> list[str]:
    """The words compared: NFKC, case-folded, accents dropped (café = cafe), punctuation and
    underscores as separators."""
    text = unicodedata.normalize("NFKC", text).casefold()
    if not text.isascii():
        text = MARKS.sub("", unicodedata.normalize("NFKD", text))
    return WORD.findall(text)


def compared(words: list[str], zero_numbers: bool) -> list[str]:
    """Numbers become 0 (datatrove's norm_numbers): a question with its numbers changed is found."""
    return ["0" if w.isdigit() else w for w in words] if zero_numbers else words


def word_hashes(words: list[str]) -> np.ndarray:
    h = xxhash.xxh3_64_intdigest
    return np.fromiter((h(w.encode("utf-8", "surrogatepass")) for w in words), dtype=np.uint64, count=len(words))


def gram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """The hash of every run of n words (a polynomial roll, wrapping mod 2^64), its length mixed in."""
    if len(hashes) < n:
        return np.empty(0, np.uint64)
    m = len(hashes) - n + 1
    out = hashes[:m].copy()
    for k in range(1, n):
        out = out * ROLL + hashes[k : m + k]
    out ^= np.uint64((n * 0xC2B2AE3D27D4EB4F) & 0xFFFFFFFFFFFFFFFF)
    out ^= out >> np.uint64(29)
    return out


# --- the benchmarks -------------------------------------------------------------------------------


@dataclass
class Benchmark:
    """One benchmark: its name, where its rows are, which columns are compared and which is the id."""

    name: str
    path: str | None = None  # a local file or folder
    hub: str | None = None  # a Hub dataset id, read from the local cache
    config: str | None = None
    split: str | None = "test"
    columns: list[str] | None = None  # null: the usual question/answer columns, else every text column
    id: str | None = None


def known_sets() -> dict[str, dict[str, Any]]:
    """conf/decontaminate/*.yaml, by name (and by Hub id)."""
    from forge.compose import conf_dir

    out: dict[str, dict[str, Any]] = {}
    for path in sorted((Path(conf_dir()) / "decontaminate").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text()) or {}
        spec.setdefault("name", path.stem)
        if spec.get("path") and not Path(spec["path"]).is_absolute():  # bundled with forge
            spec["path"] = str(Path(__file__).resolve().parents[2] / spec["path"])
        out[path.stem] = spec
        if spec.get("hub"):
            out.setdefault(spec["hub"], spec)
    return out


def resolve(entry: Any) -> Benchmark:
    """A `benchmarks:` entry: a local path, a bundled config's name, a Hub id, or a mapping."""
    if isinstance(entry, str) and Path(entry).expanduser().exists():
        return Benchmark(name=Path(entry).stem, path=str(Path(entry).expanduser()), split=None)
    known = known_sets()
    if isinstance(entry, str):
        if entry in known:
            return _from_mapping(known[entry])
        if re.fullmatch(r"[\w.-]+/[\w.-]+", entry) and not entry.startswith((".", "/")):
            return Benchmark(name=entry.split("/")[-1], hub=entry)
        names = sorted(k for k in known if "/" not in k)
        raise BenchmarkError(
            f"benchmark {entry!r}: no such file, bundled set or Hub id; bundled sets: {', '.join(names)}"
        )
    if isinstance(entry, dict):
        if not (entry.get("path") or entry.get("hub")):
            base = known.get(entry.get("name", ""))
            if base is None:
                raise BenchmarkError(f"benchmark {entry!r}: give `path` (a local file) or `hub` (a Hub id)")
            entry = {**base, **entry}
        return _from_mapping(entry)
    raise BenchmarkError(f"benchmark {entry!r}: a path, a bundled set's name, a Hub id or a mapping")


def _from_mapping(spec: dict[str, Any]) -> Benchmark:
    allowed = set(Benchmark.__dataclass_fields__)
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise BenchmarkError(f"benchmark {spec.get('name')!r}: unknown key(s) {unknown}; keys: {sorted(allowed)}")
    columns = spec.get("columns")
    spec = {**spec, "columns": [columns] if isinstance(columns, str) else columns}
    name = spec.get("name") or Path(spec.get("path") or spec.get("hub") or "benchmark").stem
    return Benchmark(**{**spec, "name": str(name)})


def _hub_files(b: Benchmark) -> list[Path]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        root = Path(snapshot_download(b.hub, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise BenchmarkError(
            f"benchmark {b.name!r}: the Hub dataset {b.hub} is not in the local Hugging Face cache and forge "
            f"downloads nothing at run time; fetch it once with `hf download --repo-type dataset {b.hub}`, "
            "or give a local file"
        ) from None
    return _data_files(root, b)


def _data_files(root: Path, b: Benchmark) -> list[Path]:
    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".parquet", ".jsonl", ".json", ".csv"))
    files = [p for p in files if not p.name.startswith(".")]
    if b.config:
        files = [p for p in files if b.config in p.relative_to(root).parts[:-1]] or files
    if b.split:
        chosen = [p for p in files if p.name.startswith(b.split) or b.split in p.relative_to(root).parts[:-1]]
        files = chosen or files
    if not files:
        raise BenchmarkError(f"benchmark {b.name!r}: no .parquet/.jsonl/.json/.csv file under {root}")
    return files


def benchmark_files(b: Benchmark) -> list[Path]:
    if b.hub:
        return _hub_files(b)
    return _data_files(Path(b.path).expanduser(), b)


def _records(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            yield from batch.to_pylist()
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            yield from csv.DictReader(fh)
    else:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json" and text.lstrip().startswith("["):
            yield from json.loads(text)
            return
        for n, line in enumerate(io.StringIO(text), 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as exc:
                    raise BenchmarkError(f"{path}:{n}: not a JSON line ({exc})") from None


def _texts(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _texts(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _texts(v)


def benchmark_items(b: Benchmark) -> Iterator[tuple[str, list[tuple[str, bool]]]]:
    """(item id, [(text, whole)]) of every row of the benchmark; `whole`: a column's own string,
    which is indexed whole when shorter than n (a list's items, such as answer choices, are not:
    a short generic option would match unrelated rows)."""
    seen_columns: set[str] = set()
    for path in benchmark_files(b):
        for n, record in enumerate(_records(path)):
            if not isinstance(record, dict):
                raise BenchmarkError(f"{path}: row {n} is not an object")
            seen_columns.update(record)
            columns = b.columns or default_columns(record)
            id_col = b.id or next((c for c in record if c.lower() in ID_COLUMNS), None)
            item = str(record[id_col]) if id_col and record.get(id_col) is not None else f"{path.stem}:{n}"
            # a column a row lacks (a sparse JSONL file) is empty for that row
            yield item, [(t, isinstance(record.get(c), str)) for c in columns for t in _texts(record.get(c))]
    missing = [c for c in b.columns or [] if c not in seen_columns]
    if missing:
        raise BenchmarkError(
            f"benchmark {b.name!r}: no row has the column(s) {missing}; its columns: {sorted(seen_columns)}"
        )


def default_columns(record: dict[str, Any]) -> list[str]:
    """The compared columns when `columns` is not given: the usual question/answer ones (any
    case) that hold text, else every column holding text but the id."""

    def has_text(value: Any) -> bool:
        return any(t.strip() for t in _texts(value))

    known = [c for c in record if c.lower() in TEXT_COLUMNS and has_text(record[c])]
    return known or [c for c, v in record.items() if c.lower() not in ID_COLUMNS and has_text(v)]


# --- the index -------------------------------------------------------------------------------------


class Index:
    """Sorted n-gram hashes with the benchmark and item each came from."""

    def __init__(
        self,
        hashes: np.ndarray,
        bench: np.ndarray,
        item: np.ndarray,
        names: list[str],
        items: list[str],
        lengths: list[int],
    ) -> None:
        self.hashes, self.bench, self.item = hashes, bench, item
        self.names, self.items, self.lengths = names, items, lengths

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                hashes=self.hashes,
                bench=self.bench,
                item=self.item,
                lengths=np.asarray(self.lengths),
                names=np.asarray(json.dumps(self.names)),
                items=np.asarray(json.dumps(self.items)),
            )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Index:
        with np.load(path) as z:
            return cls(
                z["hashes"],
                z["bench"],
                z["item"],
                json.loads(str(z["names"])),
                json.loads(str(z["items"])),
                [int(x) for x in z["lengths"]],
            )


def cache_root() -> Path:
    return Path(os.environ.get("FORGE_CACHE", Path.home() / ".cache" / "forge")) / "decontaminate"


def index_key(benchmarks: list[Benchmark], n: int, min_words: int, zero_numbers: bool) -> str:
    """A hash of what the index is made of: the settings, each benchmark's spec and its files' bytes."""
    h = xxhash.xxh3_128()
    settings = {"version": INDEX_VERSION, "n": n, "min_words": min_words, "zero_numbers": zero_numbers}
    h.update(json.dumps(settings).encode())
    for b in benchmarks:
        h.update(json.dumps({**b.__dict__, "path": None}, sort_keys=True).encode())
        for path in benchmark_files(b):
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
            h.update(b"\x00")
    return h.hexdigest()


def build_index(
    benchmarks: list[Benchmark], n: int, min_words: int, zero_numbers: bool
) -> tuple[Index, dict[str, int]]:
    hashes, bench, item, items = [], [], [], []
    skipped = 0
    lengths: set[int] = set()
    for b_index, b in enumerate(benchmarks):
        for item_id, texts in benchmark_items(b):
            at = len(items)
            items.append(item_id)
            for text, whole in texts:
                wh = word_hashes(compared(words_of(text), zero_numbers))
                size = n if len(wh) >= n else len(wh)
                if size < min_words or (size < n and not whole):
                    skipped += 1
                    continue
                g = gram_hashes(wh, size)
                lengths.add(size)
                hashes.append(g)
                bench.append(np.full(len(g), b_index, np.int32))
                item.append(np.full(len(g), at, np.int64))
    if not items:
        raise BenchmarkError(f"benchmarks {[b.name for b in benchmarks]}: no rows")
    h = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
    bi = np.concatenate(bench) if bench else np.empty(0, np.int32)
    it = np.concatenate(item) if item else np.empty(0, np.int64)
    h, first = np.unique(h, return_index=True)  # an n-gram of several items: the first one's
    index = Index(h, bi[first], it[first], [b.name for b in benchmarks], items, sorted(lengths))
    return index, {"items": len(items), "ngrams": len(h), "short_fields_skipped": skipped}


def load_index(benchmarks: list[Benchmark], n: int, min_words: int, zero_numbers: bool) -> Index:
    key = index_key(benchmarks, n, min_words, zero_numbers)
    path = cache_root() / f"{key}.npz"
    names = ", ".join(b.name for b in benchmarks)
    if path.exists():
        try:
            index = Index.load(path)
            log.info("decontaminate: index of %s (%d n-grams) from the cache %s", names, len(index.hashes), path)
            return index
        except (OSError, ValueError, KeyError) as exc:
            log.warning("decontaminate: cached index %s unreadable (%s); building it again", path, exc)
    t0 = time.monotonic()
    index, summary = build_index(benchmarks, n, min_words, zero_numbers)
    try:
        index.save(path)
        where = f"cached at {path}"
    except OSError as exc:
        where = f"not cached ({exc})"
    log.info(
        "decontaminate: index of %s: %d items, %d distinct %d-grams (fields under %d words skipped: %d) built in "
        "%.1f s, %s",
        names,
        summary["items"],
        summary["ngrams"],
        n,
        min_words,
        summary["short_fields_skipped"],
        time.monotonic() - t0,
        where,
    )
    return index


# --- the filter ------------------------------------------------------------------------------------


class DecontaminateFilter(RowFilter):
    """`{name: decontaminate, benchmarks: [...], n: 13, min_overlap: 1, min_words: 8, roles: null,
    zero_numbers: true}`.

    roles: which chat turns are compared, content and reasoning (null: every turn); documents whole.
    zero_numbers: every number compares as 0, so a benchmark question with other numbers is found.
    A removed row's value: {benchmark, item, ngram, matches}."""

    def __init__(
        self,
        benchmarks: list[Any],
        n: int = 13,
        min_overlap: int = 1,
        min_words: int = 8,
        roles: list[str] | None = None,
        zero_numbers: bool = True,
    ) -> None:
        if isinstance(benchmarks, (str, dict)):
            benchmarks = [benchmarks]
        if not benchmarks:
            raise ValueError("benchmarks: give at least one (a file, a bundled set's name or a Hub id)")
        if n < 1 or min_overlap < 1 or min_words < 1:
            raise ValueError(f"n, min_overlap and min_words must be >= 1 (got {n}, {min_overlap}, {min_words})")
        self.n, self.min_overlap = n, min_overlap
        self.min_words = min(min_words, n)
        self.roles = None if roles is None else {roles} if isinstance(roles, str) else set(roles)
        self.benchmarks = [resolve(b) for b in benchmarks]
        seen = Counter(b.name for b in self.benchmarks)
        if any(c > 1 for c in seen.values()):
            raise ValueError(
                f"benchmarks: two have the same name {sorted(k for k, c in seen.items() if c > 1)}; give one a `name`"
            )
        self.found: Counter[str] = Counter()
        # built (or loaded) now, before the run is accepted: a bad benchmark fails at once, by name
        self.zero_numbers = zero_numbers
        self.index = load_index(self.benchmarks, self.n, self.min_words, zero_numbers)

    def _text(self, row: dict[str, Any]) -> str:
        if row.get("text") is not None:
            return row["text"]
        turns = [m for m in row.get("messages") or [] if self.roles is None or m.get("role") in self.roles]
        return "\n".join(f"{m.get('reasoning') or ''}\n{m.get('content') or ''}" for m in turns)

    def check(self, row: dict[str, Any]) -> Removal | None:
        index = self.index
        if not len(index.hashes):
            return None
        words = words_of(self._text(row))
        if len(words) < index.lengths[0]:
            return None
        wh = word_hashes(compared(words, self.zero_numbers))
        first: tuple[int, int, int] | None = None  # (position, length, index entry)
        matched: set[int] = set()
        for size in index.lengths:
            grams = gram_hashes(wh, size)
            if not len(grams):
                continue
            at = np.searchsorted(index.hashes, grams)
            at[at == len(index.hashes)] = 0
            hit = np.flatnonzero(index.hashes[at] == grams)
            if not len(hit):
                continue
            matched.update(grams[hit].tolist())
            if first is None or hit[0] < first[0]:
                first = (int(hit[0]), size, int(at[hit[0]]))
        if first is None or len(matched) < self.min_overlap:
            return None
        pos, size, entry = first
        bench = index.names[int(index.bench[entry])]
        self.found[bench] += 1
        value = {
            "benchmark": bench,
            "item": index.items[int(index.item[entry])],
            "ngram": " ".join(words[pos : pos + size]),
            "matches": len(matched),
        }
        return Removal(self.name, "contaminated", value)

    def batch_counts(self) -> dict[str, Any] | None:
        if not self.found:
            return None
        out = {"contaminated_rows": dict(self.found)}
        self.found = Counter()
        return out
