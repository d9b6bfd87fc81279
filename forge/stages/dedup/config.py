"""The dedup stage's schema: `dedup:` in the config (conf/pipeline/dedup.yaml sets its defaults)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from forge.schema import neutral
from forge.stages.dedup.minhash import bands_for

POLICIES = ("first", "longest", "source")  # and meta_<column>
METHODS = ("minhash", "semantic")
EMBEDDERS = ("auto", "model", "lexical")


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
class SemanticConfig:
    """Semantic dedup (dedup.method=semantic; forge/stages/dedup/semantic.py): embed each row,
    k-means the embeddings, and within each k-means cluster remove a row whose cosine similarity
    to a row that stays is at least `threshold`.

    Attributes:
        embedder: model (the `model=` group's embedding model: vLLM on GPU, transformers on CPU,
            as for score.kind=embed) | lexical (hashed TF-IDF of words: no model, CPU) | auto
            (model when `model=` names an embedding model, else lexical).
        threshold: cosine similarity at or above which two rows are duplicates; null = the
            embedder's default: 0.9 for a model, 0.6 for lexical (whose unrelated rows stay below
            0.25 and reordered, cut or 15%-reworded copies above 0.65).
        dim: lexical: hashed dimensions.
        clusters: k-means clusters; null = one per `cluster_rows` rows.
        cluster_rows: rows per k-means cluster when `clusters` is null (pairs are compared within
            a cluster: more rows per cluster, more pairs compared, fewer missed at the borders).
        border: a row whose second-nearest centroid is within this much cosine of its nearest is
            compared in both clusters (0 = nearest only): fewer duplicates missed at cluster borders.
        kmeans_iters: Lloyd iterations.
        kmeans_sample: rows k-means is trained on (spread over the whole input).
        pair_rows: rows whose embeddings the pairs step holds at once (its memory bound; a larger
            k-means cluster is still compared whole).
        max_chars: characters of each row's compared field that are embedded.
        batch_tokens: model: tokens per forward pass (CPU) / vLLM's max_num_batched_tokens.
        seed: k-means initialisation.
    """

    embedder: str = "auto"
    threshold: float | None = None
    dim: int = 1024
    clusters: int | None = None
    cluster_rows: int = 5000
    border: float = 0.05
    kmeans_iters: int = 20
    kmeans_sample: int = 200_000
    pair_rows: int = neutral(200_000)
    max_chars: int = 8000
    batch_tokens: int = neutral(16384)
    seed: int = 1

    def cutoff(self, embedder: str) -> float:
        """The threshold in use for the chosen embedder (model | lexical)."""
        if self.threshold is not None:
            return self.threshold
        return 0.6 if embedder == "lexical" else 0.9


@dataclass
class DedupConfig:
    """What `forge pipeline=dedup` compares and keeps (forge/stages/dedup/).

    Attributes:
        field: what is compared: text | messages | messages.user | messages.assistant | a column
            (forge/stages/dedup/fields.py); normalized (NFKC, case, whitespace) first.
        method: minhash (exact + MinHash near-dedup) | semantic (embeddings, k-means, cosine
            within clusters: `dedup.semantic`).
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
    method: str = "minhash"
    exact: bool = True
    semantic: SemanticConfig = dataclasses.field(default_factory=SemanticConfig)
    minhash: MinHashConfig = dataclasses.field(default_factory=MinHashConfig)
    keep: str = "first"
    source_priority: list[str] = dataclasses.field(default_factory=list)
    signature_rows: int = neutral(20_000)
    band_tasks: int | None = neutral(None)

    def validate(self) -> None:
        from forge.schema import ConfigError

        m = self.minhash
        if self.method not in METHODS:
            raise ConfigError(f"dedup.method: {self.method!r}; one of {', '.join(METHODS)}")
        sem = self.semantic
        if sem.embedder not in EMBEDDERS:
            raise ConfigError(f"dedup.semantic.embedder: {sem.embedder!r}; one of {', '.join(EMBEDDERS)}")
        if sem.threshold is not None and not 0 < sem.threshold <= 1:
            raise ConfigError(f"dedup.semantic.threshold: must be in (0, 1] (got {sem.threshold})")
        for key in ("dim", "cluster_rows", "kmeans_iters", "kmeans_sample", "pair_rows", "max_chars", "batch_tokens"):
            if getattr(sem, key) < 1:
                raise ConfigError(f"dedup.semantic.{key}: must be >= 1 (got {getattr(sem, key)})")
        if not 0 <= sem.border <= 2:
            raise ConfigError(f"dedup.semantic.border: must be in [0, 2] (got {sem.border})")
        if sem.clusters is not None and sem.clusters < 1:
            raise ConfigError(f"dedup.semantic.clusters: must be >= 1 (got {sem.clusters})")
        if self.method == "minhash" and not self.exact and not m.enabled:
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
