"""The dedup stage's schema: `dedup:` in the config (conf/pipeline/dedup.yaml sets its defaults)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from forge.schema import neutral
from forge.stages.dedup.minhash import bands_for

POLICIES = ("first", "longest", "source")  # and meta_<column>


@dataclass
class MinHashConfig:
    """MinHash near-dedup (forge/stages/dedup/minhash.py).

    Attributes:
        enabled: run near-dedup (exact dedup is `dedup.exact`).
        threshold: estimated Jaccard similarity of the two rows' shingle sets at or above which
            they are near-copies. Bands x rows are derived so that a pair AT the threshold is a
            candidate with probability `recall` (the layout is printed), and every candidate pair
            is then verified on its signatures, so pairs below the threshold are not merged.
        num_hashes: hash functions per signature (more: a finer Jaccard estimate, slower).
        bands, rows: set both to fix the LSH layout instead of deriving it from the threshold.
        n_grams: shingle size, in words (or characters with char_ngrams).
        char_ngrams: shingles of characters instead of words (short texts, no spaces: CJK).
        recall: the candidate probability aimed for at the threshold.
        seed: the hash functions' seed (the same seed gives the same result).
    """

    enabled: bool = True
    threshold: float = 0.7
    num_hashes: int = 112
    bands: int | None = None
    rows: int | None = None
    n_grams: int = 5
    char_ngrams: bool = False
    recall: float = 0.95
    seed: int = 1

    def layout(self) -> tuple[int, int]:
        """(bands, rows per band)."""
        if self.bands is not None and self.rows is not None:
            return self.bands, self.rows
        return bands_for(self.threshold, self.num_hashes, self.recall)


@dataclass
class DedupConfig:
    """What `forge pipeline=dedup` compares and keeps (forge/stages/dedup/).

    Attributes:
        field: what is compared: text | messages | messages.user | messages.assistant | a column
            (forge/stages/dedup/fields.py); normalized (NFKC, case, whitespace) first.
        exact: remove exact copies of the normalized field across every shard and source.
        minhash: near-dedup settings.
        keep: which row of a cluster stays: first (input order) | longest | meta_<name> (highest
            value of that column) | source (the first source in `source_priority`, else in
            dataset.sources). Ties go to the first row.
        source_priority: source labels, most preferred first (keep=source).
        signature_rows: rows per file of the signatures step (a kill redoes at most one file).
        band_tasks: tasks of the buckets step (each takes every band_tasks-th band); null = as many
            as cluster.tasks, at most one per band.
    """

    field: str = "text"
    exact: bool = True
    minhash: MinHashConfig = dataclasses.field(default_factory=MinHashConfig)
    keep: str = "first"
    source_priority: list[str] = dataclasses.field(default_factory=list)
    signature_rows: int = neutral(20_000)
    band_tasks: int | None = neutral(None)

    def validate(self) -> None:
        from forge.schema import ConfigError

        m = self.minhash
        if not self.exact and not m.enabled:
            raise ConfigError("dedup: both dedup.exact and dedup.minhash.enabled are false; nothing to do")
        if self.keep not in POLICIES and not (self.keep.startswith("meta_") and len(self.keep) > 5):
            raise ConfigError(f"dedup.keep: {self.keep!r}; one of {', '.join(POLICIES)} or meta_<column>")
        if not 0 < m.threshold <= 1:
            raise ConfigError(f"dedup.minhash.threshold: must be in (0, 1] (got {m.threshold})")
        if not 0 < m.recall < 1:
            raise ConfigError(f"dedup.minhash.recall: must be in (0, 1) (got {m.recall})")
        for key in ("num_hashes", "n_grams"):
            if getattr(m, key) < 1:
                raise ConfigError(f"dedup.minhash.{key}: must be >= 1 (got {getattr(m, key)})")
        if (m.bands is None) != (m.rows is None):
            raise ConfigError("dedup.minhash.bands and dedup.minhash.rows: set both, or neither (derived)")
        if m.bands is not None and (m.bands < 1 or m.rows < 1 or m.bands * m.rows > m.num_hashes):
            raise ConfigError(
                f"dedup.minhash.bands x rows: {m.bands} x {m.rows} must be >= 1 and <= num_hashes ({m.num_hashes})"
            )
        if self.signature_rows < 1:
            raise ConfigError(f"dedup.signature_rows: must be >= 1 (got {self.signature_rows})")
        if self.band_tasks is not None and self.band_tasks < 1:
            raise ConfigError(f"dedup.band_tasks: must be >= 1 (got {self.band_tasks})")
        if not self.field:
            raise ConfigError("dedup.field: must name what is compared (text, messages, messages.user, ...)")
