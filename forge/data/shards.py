"""Reading what `forge pipeline=tokenize` wrote: token shards (Megatron .bin/.idx or .npy) with
their loss masks and document boundaries, as packed fixed-length training sequences.

Layout of a tokenize run dir (its `index.json` lists every shard once, written last):

    <run>/index.json
    <run>/tokens/<source>/shard_00000.bin, .idx            format=megatron (Megatron's indexed
    <run>/tokens/<source>/shard_00000.mask.bin, .mask.idx   dataset; the mask in the same layout)
    <run>/tokens/<source>/shard_00000.tokens.npy           format=npy (np.load(mmap_mode="r"))
    <run>/tokens/<source>/shard_00000.mask.npy
    <run>/tokens/<source>/shard_00000.docs.npy             document start offsets, then the end

Every document ends with the tokenizer's EOS. A packed sequence i of a shard is tokens
[i*L, (i+1)*L) with labels = the next token, -100 where that token is outside the loss mask or
starts another document; position ids restart at every document start (and at the sequence start).
"""

from __future__ import annotations

import bisect
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IGNORE = -100
MEGATRON_HEADER = b"MMIDIDX\x00\x00"
# Megatron's DType codes (megatron/core/datasets/indexed_dataset.py)
MEGATRON_DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


def read_megatron_index(path: Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """(dtype, sequence lengths, byte pointers, document indices) of a Megatron .idx file."""
    with open(path, "rb") as fh:
        header = fh.read(9)
        if header != MEGATRON_HEADER:
            raise ValueError(f"{path}: not a Megatron index (header {header!r})")
        (version,) = struct.unpack("<Q", fh.read(8))
        (code,) = struct.unpack("<B", fh.read(1))
        (sequences,) = struct.unpack("<Q", fh.read(8))
        (documents,) = struct.unpack("<Q", fh.read(8))
        offset = fh.tell()
    if version != 1:
        raise ValueError(f"{path}: Megatron index version {version}; forge reads version 1")
    lengths = np.memmap(path, np.int32, "r", offset, (sequences,))
    pointers = np.memmap(path, np.int64, "r", offset + 4 * sequences, (sequences,))
    docs = np.memmap(path, np.int64, "r", offset + 12 * sequences, (documents,))
    return np.dtype(MEGATRON_DTYPES[code]), lengths, pointers, docs


@dataclass
class Shard:
    """One shard's tokens, mask and document starts (memory-mapped on first use)."""

    prefix: Path
    fmt: str
    tokens: int
    documents: int

    def open(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, mask, doc_starts + [end])."""
        if self.fmt == "npy":
            base = str(self.prefix)
            toks = np.load(base + ".tokens.npy", mmap_mode="r")
            mask = np.load(base + ".mask.npy", mmap_mode="r")
            starts = np.load(base + ".docs.npy", mmap_mode="r")
            return toks, mask, starts
        dtype, lengths, _, _ = read_megatron_index(Path(f"{self.prefix}.idx"))
        toks = np.memmap(f"{self.prefix}.bin", dtype, "r")
        mask = np.memmap(f"{self.prefix}.mask.bin", np.uint8, "r")
        starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])  # one sequence per document
        return toks, mask, starts


def read_index(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "index.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a finished `forge pipeline=tokenize` run dir (no index.json)")
    return json.loads(path.read_text())


class TokenShards:
    """Packed sequences of `seq_len` tokens over every shard of a tokenize run dir (or of the
    named sources). A map-style dataset: `ds[i]` is a dict of numpy arrays `input_ids`, `labels`
    (-100 outside the loss mask and across document boundaries) and `position_ids` (restarting
    per document). Picklable: worker processes of a DataLoader map the files themselves."""

    def __init__(
        self,
        run_dir: str | Path,
        seq_len: int | None = None,
        sources: list[str] | str | None = None,
        dtype: str = "int64",
    ) -> None:
        self.run_dir = Path(run_dir)
        self.dtype = np.dtype(dtype)  # of every array returned (torch's cross-entropy wants int64 labels)
        self._ignore = self.dtype.type(IGNORE)
        index = read_index(self.run_dir)
        seq_len = seq_len or index.get("seq_len")
        if not seq_len:
            raise ValueError(f"{self.run_dir}: pass seq_len (the run was tokenized without tokenize.seq_len)")
        self.seq_len = int(seq_len)
        wanted = [sources] if isinstance(sources, str) else sources
        known = list(index["sources"])
        if wanted is not None:
            missing = [s for s in wanted if s not in known]
            if missing:
                raise KeyError(f"{self.run_dir}: no source {missing}; its sources: {known}")
        self.sources = wanted or known
        self.shards = [
            Shard(self.run_dir / s["prefix"], index["format"], s["tokens"], s["documents"])
            for name in self.sources
            for s in index["sources"][name]["shards"]
        ]
        counts = [max(0, (s.tokens - 1) // self.seq_len) for s in self.shards]  # the next token is a label
        self.bounds = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._bounds = self.bounds.tolist()
        self._open: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._positions = np.arange(self.seq_len, dtype=self.dtype)
        self._positions.flags.writeable = False  # shared by every sequence without a document start

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, runs, doc starts + [end]) of shard k: plain ndarray views of the memory maps,
        and the [start, end) runs of tokens outside the loss mask (none for documents), found once."""
        found = self._open.get(k)
        if found is None:
            toks, mask, starts = self.shards[k].open()
            mask = np.asarray(mask)
            edges = np.flatnonzero(np.diff(mask.view(np.int8))) + 1
            bounds = np.concatenate([[0], edges, [len(mask)]]).astype(np.int64)
            off = bounds[:-1][mask[bounds[:-1]] == 0] if len(mask) else bounds[:0]
            ends = bounds[1:][mask[bounds[:-1]] == 0] if len(mask) else bounds[:0]
            runs = np.stack([off, ends], axis=1) if len(off) else np.empty((0, 2), np.int64)
            found = self._open[k] = (np.asarray(toks), runs, np.asarray(starts, dtype=np.int64))
        return found

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, first token) of sequence i."""
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} of {len(self)}")
        k = bisect.bisect_right(self._bounds, i) - 1
        return k, (i - self._bounds[k]) * self.seq_len

    def _fill(self, toks: np.ndarray, runs: np.ndarray, starts: np.ndarray, s: int, labels: np.ndarray) -> np.ndarray:
        """-100 into labels (the tokens s+1..s+n) outside the mask and at document starts;
        returns the position ids."""
        n = self.seq_len
        if len(runs):  # runs of unmasked tokens overlapping (s, s + n]
            a = int(np.searchsorted(runs[:, 1], s + 1, side="right"))
            b = int(np.searchsorted(runs[:, 0], s + n + 1))
            for lo, hi in runs[a:b]:
                labels[max(lo, s + 1) - s - 1 : min(hi, s + n + 1) - s - 1] = IGNORE
        lo, hi = np.searchsorted(starts, (s + 1, s + n + 1)).tolist()  # starts in (s, s + n]
        if lo == hi:  # no document starts inside: the shared positions 0..n-1
            return self._positions
        inner = starts[lo:hi] - s
        labels[inner - 1] = IGNORE  # those labels would predict across documents
        inner = inner[inner < n]
        if len(inner) <= 8:  # a few documents: a slice each
            positions = self._positions.copy()
            for st in inner.tolist():
                positions[st:] = self._positions[: n - st]
            return positions
        # many short documents: each position minus its document's start, in one np.repeat
        bounds = np.concatenate(([0], inner, [n]))
        return self._positions - np.repeat(bounds[:-1].astype(self.dtype), np.diff(bounds))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        k, s = self.locate(int(i))
        toks, runs, starts = self._shard(k)
        window = toks[s : s + self.seq_len + 1].astype(self.dtype)
        labels = window[1:].copy()
        positions = self._fill(toks, runs, starts, s, labels)
        return {"input_ids": window[:-1], "labels": labels, "position_ids": positions}

    def __getitems__(self, indices: list[int]) -> list[dict[str, np.ndarray]]:
        """A batch (torch's DataLoader calls this when it exists)."""
        return [self[i] for i in indices]

    def documents(self) -> int:
        return sum(s.documents for s in self.shards)

    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)
