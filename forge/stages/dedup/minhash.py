"""MinHash signatures and LSH bands, vectorized over whole batches of documents.

datatrove computes one document at a time (Python n-grams, one hash per shingle, a (shingles x
hashes) product per document). Here a batch's word hashes are computed once, n-gram hashes are
rolled with numpy over the whole batch, and the minimum per (document, hash function) is one
`np.minimum.reduceat` over the concatenated shingles: a handful of numpy calls per batch instead
of several per document.

Hash family: h_i(x) = (a_i * x + b_i) >> 32 on uint64 with wrap-around (multiply-shift, a
2-universal family for odd a_i), so no modulo by a Mersenne prime and no overflow to get wrong.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import numpy as np
import xxhash

WORD = re.compile(r"\w+", re.UNICODE)
EMPTY = np.uint32(0xFFFFFFFF)  # the signature of a document with no shingle


INVISIBLE = re.compile("[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")  # soft hyphen, zero-width, BOM


def normalize(text: str) -> str:
    """What dedup compares: NFKC, case-folded, invisible characters (zero-width, soft hyphen,
    BOM, direction marks) dropped, whitespace collapsed: unicode and spacing variants of one
    text are one text."""
    return " ".join(INVISIBLE.sub("", unicodedata.normalize("NFKC", text)).casefold().split())


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    """P(a pair of this Jaccard similarity shares at least one band): 1 - (1 - J^r)^b."""
    return 1 - (1 - jaccard**rows) ** bands


def bands_for(threshold: float, num_hashes: int, recall: float = 0.95) -> tuple[int, int]:
    """(bands, rows per band), bands x rows <= num_hashes: the most rows per band (fewest chance
    candidates) that still makes a pair AT the threshold a candidate with probability >= recall.
    Candidates are then verified on their signatures' agreement, so the S-curve sits below the
    threshold, not on it (at its midpoint half the pairs just above it would be missed)."""
    for rows in range(num_hashes, 0, -1):
        bands = num_hashes // rows
        if candidate_probability(threshold, bands, rows) >= recall:
            return bands, rows
    return num_hashes, 1


@dataclass(frozen=True)
class MinHasher:
    n_grams: int = 5
    num_hashes: int = 112
    seed: int = 1
    char_ngrams: bool = False  # shingles of characters instead of words

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        a = rng.integers(1, 2**63, size=self.num_hashes, dtype=np.uint64) | np.uint64(1)  # odd
        b = rng.integers(0, 2**63, size=self.num_hashes, dtype=np.uint64)
        object.__setattr__(self, "_a", a)
        object.__setattr__(self, "_b", b)

    def shingles(self, text: str) -> np.ndarray:
        """uint64 hashes of the text's n-grams (words, or characters), in order; a text shorter
        than n gives one shingle of the whole text; an empty one gives none."""
        text = normalize(text)
        if self.char_ngrams:
            units = [text[i : i + 1] for i in range(len(text))]
        else:
            units = WORD.findall(text)
        if not units:
            return np.empty(0, dtype=np.uint64)
        h = xxhash.xxh3_64_intdigest
        words = np.fromiter((h(u.encode("utf-8", "surrogatepass")) for u in units), dtype=np.uint64, count=len(units))
        n = min(self.n_grams, len(words))
        # an n-gram's hash: a polynomial roll of its units' hashes (wraps mod 2^64), then mixed
        out = words[: len(words) - n + 1].copy()
        for k in range(1, n):
            out = out * np.uint64(0x9E3779B97F4A7C15) + words[k : len(words) - n + 1 + k]
        out ^= out >> np.uint64(31)
        return out

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_hashes) uint32 signatures; a text with no shingle gets all EMPTY."""
        parts = [self.shingles(t) for t in texts]
        counts = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        sig = np.full((len(texts), self.num_hashes), EMPTY, dtype=np.uint32)
        have = counts > 0
        if not have.any():
            return sig
        flat = np.concatenate([p for p in parts if len(p)])
        starts = np.concatenate([[0], np.cumsum(counts[have])[:-1]])
        chunk = max(1, (1 << 22) // self.num_hashes)  # bound the (shingles x hashes) block to ~16 MB
        mins = np.empty((int(have.sum()), self.num_hashes), dtype=np.uint32)
        # rows of `flat` are split between documents; process whole documents per block
        doc_ends = np.cumsum(counts[have])
        lo_doc = 0
        while lo_doc < len(doc_ends):
            lo = 0 if lo_doc == 0 else int(doc_ends[lo_doc - 1])
            hi_doc = int(np.searchsorted(doc_ends, lo + chunk, side="right"))
            hi_doc = max(hi_doc, lo_doc + 1)
            hi = int(doc_ends[hi_doc - 1])
            block = flat[lo:hi, None] * self._a + self._b
            hashed = (block >> np.uint64(32)).astype(np.uint32)
            mins[lo_doc:hi_doc] = np.minimum.reduceat(hashed, starts[lo_doc:hi_doc] - lo, axis=0)
            lo_doc = hi_doc
        sig[have] = mins
        return sig


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(N, bands) uint64: each band's rows hashed into one key (equal keys: a candidate pair)."""
    used = sig[:, : bands * rows].astype(np.uint64).reshape(len(sig), bands, rows)
    key = np.zeros((len(sig), bands), dtype=np.uint64)
    for r in range(rows):
        key = key * np.uint64(0x100000001B3) + used[:, :, r] + np.uint64(r + 1)
    key ^= key >> np.uint64(29)
    return key


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """The share of hash functions on which two signatures agree."""
    return float(np.mean(a == b))


def connected_components(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Label of each of n nodes (the smallest node of its component), from edges left-right:
    min-label propagation with pointer jumping, all in numpy (memory: a few arrays of n and edges)."""
    label = np.arange(n, dtype=np.int64)
    if len(left) == 0:
        return label
    left = np.asarray(left, dtype=np.int64)
    right = np.asarray(right, dtype=np.int64)
    while True:
        low = np.minimum(label[left], label[right])
        before = label.copy()
        np.minimum.at(label, left, low)
        np.minimum.at(label, right, low)
        while True:  # pointer jumping: every node points at its root
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped
        if np.array_equal(label, before):
            return label
