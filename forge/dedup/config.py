"""The dedup stage's schema: `dedup:` in the config (conf/pipeline/dedup.yaml sets its defaults).
WIP (issue 14): the knobs the issue's commands use; the workflow that reads them is next."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class MinHashConfig:
    """MinHash near-dedup (forge/dedup/minhash.py).

    Attributes:
        enabled: run near-dedup (exact dedup always runs first).
        threshold: estimated Jaccard at or above which two rows are near-copies; bands x rows are
            derived so that a pair at the threshold is a candidate with probability `recall`
            (printed), and candidates are verified on their signatures.
        num_hashes: hash functions per signature.
        bands, rows: set both to fix the LSH layout instead of deriving it from the threshold.
        n_grams: shingle size; char_ngrams: shingles of characters instead of words.
        recall: the candidate probability aimed for at the threshold.
        seed: the hash functions' seed (the same seed gives the same result).
    """

    enabled: bool = True
    threshold: float = 0.8
    num_hashes: int = 112
    bands: int | None = None
    rows: int | None = None
    n_grams: int = 5
    char_ngrams: bool = False
    recall: float = 0.95
    seed: int = 1


@dataclass
class DedupConfig:
    """What `forge pipeline=dedup` compares and keeps (forge/dedup/).

    Attributes:
        field: what is compared: text | messages | messages.user | messages.assistant | a column
            (forge/dedup/fields.py); normalized (NFKC, case, whitespace) first.
        exact: drop exact copies of the normalized field across every shard and source.
        minhash: near-dedup settings.
        keep: which row of a cluster stays: first | longest | meta_<name> (highest value) |
            source (the order of `source_priority`, else of dataset.sources).
        source_priority: source labels, most preferred first (keep=source).
        band_tasks: tasks of the buckets step (each takes a range of bands).
    """

    field: str = "text"
    exact: bool = True
    minhash: MinHashConfig = dataclasses.field(default_factory=MinHashConfig)  # `field` is a knob here
    keep: str = "first"
    source_priority: list[str] = dataclasses.field(default_factory=list)
    band_tasks: int = 1
