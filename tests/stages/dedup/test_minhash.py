"""MinHash signatures, bands and components on data the test makes: planted near-copies at known
Jaccard similarities among unrelated documents."""

from __future__ import annotations

import random

import numpy as np
import pytest

from forge.stages.dedup.minhash import (
    MinHasher,
    band_keys,
    bands_for,
    connected_components,
    estimated_jaccard,
    normalize,
)


def _words(rng: random.Random, n: int) -> list[str]:
    return [f"w{rng.randrange(50_000)}" for _ in range(n)]


def test_normalize_folds_unicode_case_and_spacing() -> None:
    assert normalize("Ｈｅｌｌｏ\u00a0  World\n") == normalize("hello world") == "hello world"
    assert normalize("he\u200bllo\u00ad \ufeffWORLD") == "hello world"
    assert normalize("caf\u0065\u0301") == normalize("caf\u00e9")  # decomposed and composed accents


def test_signature_agreement_estimates_jaccard() -> None:
    rng = random.Random(0)
    mh = MinHasher(n_grams=1, num_hashes=256)
    base = _words(rng, 400)
    for keep in (0.9, 0.6, 0.3):
        other = base[: int(400 * keep)] + _words(rng, 400 - int(400 * keep))
        true = len(set(base) & set(other)) / len(set(base) | set(other))
        sig = mh.signatures([" ".join(base), " ".join(other)])
        assert abs(estimated_jaccard(sig[0], sig[1]) - true) < 0.08


def test_batch_signatures_equal_one_by_one_and_empty_texts() -> None:
    rng = random.Random(1)
    mh = MinHasher(num_hashes=64)
    texts = [" ".join(_words(rng, rng.randrange(0, 300))) for _ in range(50)] + ["", "   ", "short"]
    batch = mh.signatures(texts)
    single = np.vstack([mh.signatures([t]) for t in texts])
    assert np.array_equal(batch, single)
    assert (batch[-3] == 0xFFFFFFFF).all() and (batch[-1] != 0xFFFFFFFF).any()


def test_bands_for_threshold() -> None:
    from forge.stages.dedup.minhash import candidate_probability

    for t in (0.5, 0.7, 0.8, 0.9):
        bands, rows = bands_for(t, 112)
        assert bands * rows <= 112 and candidate_probability(t, bands, rows) >= 0.95
        assert candidate_probability(t, 112 // (rows + 1), rows + 1) < 0.95 or rows == 112  # the most rows that do


def test_planted_pairs_found_and_unrelated_kept() -> None:
    rng = random.Random(2)
    mh = MinHasher(n_grams=3, num_hashes=112)
    bands, rows = bands_for(0.7, 112)
    docs, pairs = [], []
    for _ in range(300):
        docs.append(" ".join(_words(rng, 200)))
    for i in range(100):  # near-copies with ~5% of words replaced
        words = docs[i].split()
        for j in rng.sample(range(len(words)), 4):  # ~12 of ~198 trigrams change: Jaccard ~0.89
            words[j] = f"x{rng.randrange(10**6)}"
        docs.append(" ".join(words))
        pairs.append((i, len(docs) - 1))
    keys = band_keys(mh.signatures(docs), bands, rows)
    left, right = [], []
    for b in range(bands):
        order = np.argsort(keys[:, b], kind="stable")
        k = keys[order, b]
        same = np.nonzero(k[1:] == k[:-1])[0]
        left += order[same].tolist()
        right += order[same + 1].tolist()
    label = connected_components(len(docs), np.array(left), np.array(right))
    found = sum(label[a] == label[b] for a, b in pairs)
    assert found / len(pairs) >= 0.95
    unrelated = set(range(100, 300))
    assert sum(1 for i in unrelated if (label == label[i]).sum() > 1) / len(unrelated) < 0.01


@pytest.mark.parametrize("edges", [([], []), ([0, 2, 5], [1, 3, 4]), ([9, 8, 7, 6], [8, 7, 6, 0])])
def test_components(edges: tuple[list[int], list[int]]) -> None:
    label = connected_components(10, np.array(edges[0]), np.array(edges[1]))
    for a, b in zip(*edges, strict=True):
        assert label[a] == label[b] == min(label[a], label[b])
    assert label.tolist() == [min(i, label[i]) for i in range(10)]
