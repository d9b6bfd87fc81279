"""Clusters and keep policies on planted near-copies at known similarities."""

from __future__ import annotations

import random

import numpy as np
import pytest

from forge.dedup.clusters import candidate_pairs, keep_one, verified
from forge.dedup.minhash import MinHasher, band_keys, bands_for, connected_components


def _doc(rng: random.Random, n: int = 200) -> list[str]:
    return [f"w{rng.randrange(50_000)}" for _ in range(n)]


def _copy(rng: random.Random, words: list[str], changed: int) -> list[str]:
    out = list(words)
    for j in rng.sample(range(len(out)), changed):
        out[j] = f"x{rng.randrange(10**7)}"
    return out


def _run(docs: list[str], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    mh = MinHasher(n_grams=3, num_hashes=112)
    sig = mh.signatures(docs)
    left, right = candidate_pairs(band_keys(sig, *bands_for(threshold, 112)))
    ok = verified(sig, left, right, threshold)
    return connected_components(len(docs), left[ok], right[ok]), sig


def test_pairs_above_the_threshold_are_found_and_below_it_mostly_not() -> None:
    rng = random.Random(3)
    base = [_doc(rng) for _ in range(400)]
    docs = [" ".join(d) for d in base]
    # trigram Jaccard after c of 200 words change is about (198 - 3c) / (198 + 3c)
    planted = {0.9: 3, 0.8: 7, 0.6: 17}
    pairs: dict[float, list[tuple[int, int]]] = {j: [] for j in planted}
    for k, (j, changed) in enumerate(planted.items()):
        for i in range(k * 100, k * 100 + 100):
            docs.append(" ".join(_copy(rng, base[i], changed)))
            pairs[j].append((i, len(docs) - 1))
    label, _ = _run(docs, threshold=0.7)
    found = {j: np.mean([label[a] == label[b] for a, b in ps]) for j, ps in pairs.items()}
    assert found[0.9] >= 0.95 and found[0.8] >= 0.95 and found[0.6] < 0.2, found
    unrelated = range(300, 400)
    assert sum((label == label[i]).sum() > 1 for i in unrelated) == 0


@pytest.mark.parametrize("policy", ["first", "longest", "meta", "source"])
def test_keep_policies(policy: str) -> None:
    rng = random.Random(4)
    words = _doc(rng)
    docs = [" ".join(words), " ".join(words + ["tail"]), " ".join(_doc(rng)), " ".join(words[:-1])]
    label, sig = _run(docs, 0.7)
    assert label[0] == label[1] == label[3] != label[2]
    removals = keep_one(
        label, sig, policy, lengths=[len(d) for d in docs], values=[0.2, None, 0.9, 0.5], source_rank=[2, 2, 0, 1]
    )
    kept = {0: 0, "first": 0, "longest": 1, "meta": 3, "source": 3}[policy]
    assert sorted(r.row for r in removals) == sorted({0, 1, 3} - {kept})
    assert all(r.kept == kept and 0.7 <= r.jaccard <= 1.0 for r in removals)
