"""The trainer's shards, written once every task of `pipeline=tokenize` is done (locally, or by
Slurm's finalize job): data/ chunks in (task, chunk) order, one token stream per source, cut into
shards of at most `tokenize.shard_tokens` tokens at document boundaries.

megatron: <prefix>.bin/.idx exactly as Megatron-LM's IndexedDatasetBuilder writes them (one
sequence per document, document_indices 0..n; dtype uint16, or int32 when the vocab needs more:
Megatron has no uint32), and the loss mask as <prefix>.mask.bin/.mask.idx (uint8, same lengths).
npy: <prefix>.tokens.npy (uint16/uint32), <prefix>.mask.npy (uint8), <prefix>.docs.npy (int64
document starts, then the end).

Shards are written under tokens/.partial/ and moved into place when whole; index.json, listing
every shard once, is written last. A killed or repeated finish starts this over from data/: no
partial shard is ever listed, none is listed twice.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from forge.data.shards import MEGATRON_HEADER
from forge.run.output import shard_files, write_json_atomic

MEGATRON_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int32): 4, np.dtype(np.uint16): 8}


def write_megatron_index(path: Path, dtype: np.dtype, lengths: np.ndarray) -> None:
    """The .idx of a Megatron indexed dataset: one sequence per document."""
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths.astype(np.int64) * dtype.itemsize)[:-1]]).astype(np.int64)
    docs = np.arange(len(lengths) + 1, dtype=np.int64)
    with open(path, "wb") as fh:
        fh.write(MEGATRON_HEADER)
        fh.write(struct.pack("<Q", 1))
        fh.write(struct.pack("<B", MEGATRON_CODES[dtype]))
        fh.write(struct.pack("<Q", len(lengths)))
        fh.write(struct.pack("<Q", len(docs)))
        fh.write(lengths.tobytes(order="C"))
        fh.write(pointers[: len(lengths)].tobytes(order="C"))
        fh.write(docs.tobytes(order="C"))


class ShardWriter:
    """One shard being written (in a partial dir), of a known size."""

    def __init__(self, out_dir: Path, rel: str, fmt: str, dtype: np.dtype, tokens: int, documents: int) -> None:
        self.rel, self.tokens, self.documents = rel, tokens, documents
        partial, final = out_dir / "tokens" / ".partial" / rel, out_dir / rel
        self.partial, self.final, self.fmt = partial, final, fmt
        self.dtype = np.dtype(np.int32) if fmt == "megatron" and dtype == np.uint32 else dtype
        self.lengths: list[int] = []
        self.at = 0
        partial.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "megatron":
            self.tok_fh = open(f"{partial}.bin", "wb")
            self.mask_fh = open(f"{partial}.mask.bin", "wb")
        else:
            fmt_open = np.lib.format.open_memmap
            self.tok = fmt_open(f"{partial}.tokens.npy", mode="w+", dtype=self.dtype, shape=(tokens,))
            self.mask = fmt_open(f"{partial}.mask.npy", mode="w+", dtype=np.uint8, shape=(tokens,))

    def add(self, tokens: np.ndarray, mask: np.ndarray) -> None:
        if self.fmt == "megatron":
            self.tok_fh.write(tokens.astype(self.dtype, copy=False).tobytes())
            self.mask_fh.write(mask.tobytes())
        else:
            self.tok[self.at : self.at + len(tokens)] = tokens
            self.mask[self.at : self.at + len(tokens)] = mask
        self.at += len(tokens)
        self.lengths.append(len(tokens))

    def close(self) -> list[str]:
        """Finish the files and move them into place; returns their suffixes."""
        lengths = np.array(self.lengths, dtype=np.int64)
        if self.fmt == "megatron":
            for fh in (self.tok_fh, self.mask_fh):
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
            write_megatron_index(Path(f"{self.partial}.idx"), self.dtype, lengths)
            write_megatron_index(Path(f"{self.partial}.mask.idx"), np.dtype(np.uint8), lengths)
            suffixes = [".bin", ".idx", ".mask.bin", ".mask.idx"]
        else:
            self.tok.flush()
            self.mask.flush()
            del self.tok, self.mask
            starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            np.save(f"{self.partial}.docs.npy", starts)
            suffixes = [".tokens.npy", ".mask.npy", ".docs.npy"]
        self.final.parent.mkdir(parents=True, exist_ok=True)
        for s in suffixes:
            os.replace(f"{self.partial}{s}", f"{self.final}{s}")
        return suffixes


def _plan(files: list[Path], shard_tokens: int) -> dict[str, list[tuple[int, int]]]:
    """Per source, (tokens, documents) of each shard, cutting before a document that would overflow."""
    plan: dict[str, list[list[int]]] = {}
    for f in files:
        t = pq.read_table(f, columns=["source", "num_tokens"])
        for source, n in zip(t.column("source").to_pylist(), t.column("num_tokens").to_pylist(), strict=True):
            shards = plan.setdefault(source, [[0, 0]])
            if shards[-1][1] and shards[-1][0] + n > shard_tokens:
                shards.append([0, 0])
            shards[-1][0] += n
            shards[-1][1] += 1
    return {s: [(a, b) for a, b in v] for s, v in plan.items()}


def safe_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip(".") or "source"


def stream_dirs(sources: list[str]) -> dict[str, str]:
    """A filesystem-safe directory name per token stream, distinct even where two names only
    differ in what safe_name replaces (`org/data` and `org_data`, both streams of a curated mix)."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for source in sorted(sources):
        base = name = safe_name(source)
        k = 1
        while name.lower() in taken:  # case-insensitive filesystems too
            k += 1
            name = f"{base}_{k}"
        taken.add(name.lower())
        out[source] = name
    return out


def write_shards(out_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Build tokens/ and index.json from data/; returns the index."""
    t = settings["tokenize"]
    fmt, shard_tokens = t["format"], t["shard_tokens"]
    dtype = np.dtype(settings["tokenizer"]["dtype"])
    root = out_dir / "tokens"
    (out_dir / "index.json").unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    files = shard_files(out_dir / "data")
    plan = _plan(files, shard_tokens)
    names = stream_dirs(list(plan))
    shard_no = dict.fromkeys(plan, 0)
    open_: dict[str, ShardWriter] = {}
    listed: dict[str, list[dict[str, Any]]] = {s: [] for s in plan}

    def start(source: str) -> ShardWriter:
        k = shard_no[source]
        tokens, docs = plan[source][k]
        return ShardWriter(out_dir, f"tokens/{names[source]}/shard_{k:05d}", fmt, dtype, tokens, docs)

    def finish(source: str) -> None:
        w = open_.pop(source)
        w.close()
        entry = {"prefix": w.rel, "tokens": w.tokens, "documents": w.documents}
        if t.get("seq_len"):
            entry["sequences"] = max(0, (w.tokens - 1) // t["seq_len"])
        listed[source].append(entry)
        shard_no[source] += 1

    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(columns=["source", "tokens", "mask"], batch_size=8192):
            sources = batch.column("source").to_pylist()
            tok_col, mask_col = batch.column("tokens"), batch.column("mask")
            offsets = tok_col.offsets.to_numpy()
            toks = tok_col.values.to_numpy()
            masks = mask_col.values.to_numpy()
            base = offsets[0]
            for i, source in enumerate(sources):
                w = open_.get(source) or open_.setdefault(source, start(source))
                a, b = offsets[i] - base, offsets[i + 1] - base
                if w.lengths and len(w.lengths) == w.documents:  # the planned shard is full
                    finish(source)
                    w = open_.setdefault(source, start(source))
                w.add(toks[a:b], masks[a:b])
    for source in list(open_):
        finish(source)
    shutil.rmtree(root / ".partial", ignore_errors=True)
    index = {
        "format": fmt,
        "dtype": "int32" if fmt == "megatron" and dtype == np.uint32 else dtype.name,
        "vocab_size": settings["tokenizer"]["vocab_size"],
        "eos_id": settings["tokenizer"]["eos_id"],
        "tokenizer": settings["tokenizer"]["tokenizer"],
        "seq_len": t.get("seq_len"),
        "sources": {
            s: {"shards": v, "tokens": sum(x["tokens"] for x in v), "documents": sum(x["documents"] for x in v)}
            for s, v in listed.items()
        },
    }
    write_json_atomic(out_dir / "index.json", index)
    return index


def add_report(out_dir: Path, stats: dict[str, Any]) -> None:
    """The finish of a tokenize run: the shards and index.json, and their counts in stats.json."""
    manifest = json.loads((out_dir / "forge_run.json").read_text())
    index = write_shards(out_dir, manifest["settings"])
    stats["tokenize"] = {
        "format": index["format"],
        "dtype": index["dtype"],
        "seq_len": index["seq_len"],
        "tokens": sum(s["tokens"] for s in index["sources"].values()),
        "documents": sum(s["documents"] for s in index["sources"].values()),
        "loss_tokens": stats.get("loss_tokens", 0),
        "shards": [{"source": src, **sh} for src, v in index["sources"].items() for sh in v["shards"]],
    }
    if stats.get("kept_with_dropped_content"):  # tokenize.on_dropped=keep
        stats["tokenize"]["kept_with_dropped_content"] = stats["kept_with_dropped_content"]


def card_lines(stats: dict[str, Any]) -> list[str]:
    t = stats.get("tokenize")
    if not t:
        return []
    lines = [
        "## Tokens",
        "",
        f"{t['tokens']:,} tokens in {t['documents']:,} documents ({t['loss_tokens']:,} in the loss mask), "
        f"format `{t['format']}` ({t['dtype']}); index: `index.json`. Read with "
        "`forge.data.TokenShards(run_dir, seq_len)`.",
        "",
        "| shard | source | tokens | documents |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| `{s['prefix']}` | `{s['source']}` | {s['tokens']:,} | {s['documents']:,} |" for s in t["shards"]]
    lines.append("")
    dropped = t.get("kept_with_dropped_content") or {}
    if dropped:
        listed = ", ".join(f"{n:,} rows whose {what} the chat template does not render" for what, n in dropped.items())
        lines += [f"**Kept with content the template drops** (`tokenize.on_dropped=keep`): {listed}.", ""]
    return lines
