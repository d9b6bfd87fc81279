"""From band keys to removals: candidate pairs (rows sharing a band key), verified on their
signatures' agreement, grouped into clusters (connected components), one row kept per cluster
by a policy, and for every other row the id it duplicates and the estimated Jaccard."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

POLICIES = ("first", "longest", "meta", "source")


def candidate_pairs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows adjacent in each band's sorted keys with equal keys: a chain per bucket, enough to
    connect the bucket (k rows give k-1 pairs, not k^2/2)."""
    left, right = [], []
    for b in range(keys.shape[1]):
        order = np.argsort(keys[:, b], kind="stable")
        k = keys[order, b]
        same = np.nonzero(k[1:] == k[:-1])[0]
        left.append(order[same])
        right.append(order[same + 1])
    if not left:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    pairs = np.unique(np.stack([np.concatenate(left), np.concatenate(right)], axis=1), axis=0)
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)


def verified(sig: np.ndarray, left: np.ndarray, right: np.ndarray, threshold: float) -> np.ndarray:
    """Mask of the pairs whose signatures agree on at least `threshold` of the hash functions."""
    if len(left) == 0:
        return np.zeros(0, bool)
    return (sig[left] == sig[right]).mean(axis=1) >= threshold


@dataclass
class Removal:
    row: int
    kept: int
    jaccard: float


def keep_one(
    label: np.ndarray,
    sig: np.ndarray,
    policy: str = "first",
    lengths: Sequence[int] | None = None,
    values: Sequence[float | None] | None = None,
    source_rank: Sequence[int] | None = None,
) -> list[Removal]:
    """One row kept per cluster (label), by policy; ties go to the first row (input order):
    first; longest (lengths); meta (the highest of `values`, None lowest); source (the lowest
    source_rank: the order of dataset.sources, or a priority list)."""
    n = len(label)
    order = np.arange(n)
    if policy == "first":
        score = -order.astype(np.float64)
    elif policy == "longest":
        score = np.asarray(lengths, dtype=np.float64)
    elif policy == "meta":
        score = np.array([-np.inf if v is None else float(v) for v in values], dtype=np.float64)
    elif policy == "source":
        score = -np.asarray(source_rank, dtype=np.float64)
    else:
        raise ValueError(f"dedup.keep: {policy!r}; one of {', '.join(POLICIES)}")
    # sort by (label, -score, order): the first row of each label is its keeper
    ranked = np.lexsort((order, -score, label))
    first = np.ones(n, bool)
    first[1:] = label[ranked][1:] != label[ranked][:-1]
    keeper_of_label = {int(label[i]): int(i) for i in ranked[first]}
    removals = []
    for i in ranked[~first]:
        k = keeper_of_label[int(label[i])]
        removals.append(Removal(int(i), k, float(np.mean(sig[i] == sig[k]))))
    return removals
