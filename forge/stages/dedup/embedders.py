"""What semantic dedup embeds with: the `model=` group's embedding model through the score
stage's engines (forge/stages/score/backends.py: vLLM's pooling runner on GPU, transformers on
CPU), or a lexical embedder that needs no model.

The lexical embedder is hashed TF-IDF: each word (NFKC, case-folded) is hashed into one of `dim`
buckets with a sign (the hashing trick; the signs keep unrelated rows near cosine 0), counts are
damped (1 + log tf), and the inverse document frequency of each bucket is applied later, once the
embeddings step has counted it over the whole input (`idf`): raw vectors are stored, so no
second pass over the input is needed. It finds reordered, truncated and lightly reworded copies;
paraphrases in other words need a model.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from forge.config import ForgeConfig

log = logging.getLogger("forge.stages.dedup")
WORD = re.compile(r"\w+")


def is_embedding_model(name_or_path: str) -> bool:
    """A checkpoint made for embeddings: 'embed' in its name, or sentence-transformers files."""
    path = Path(name_or_path)
    if "embed" in path.name.lower():
        return True
    return path.is_dir() and ((path / "modules.json").exists() or (path / "1_Pooling").is_dir())


def choose_embedder(cfg: ForgeConfig) -> str:
    """dedup.semantic.embedder with `auto` decided: model for an embedding model, else lexical."""
    chosen = cfg.dedup.semantic.embedder
    if chosen == "auto":
        chosen = "model" if is_embedding_model(cfg.model.name_or_path) else "lexical"
    return chosen


class LexicalEmbedder:
    """Hashed, signed, sublinear term frequencies (float32, not normalized; see `weigh`)."""

    kind = "lexical"

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def embed(self, texts: list[str]) -> np.ndarray:
        rows, buckets, signs = [], [], []
        h = xxhash.xxh3_64_intdigest
        for i, text in enumerate(texts):
            words = WORD.findall(unicodedata.normalize("NFKC", text).casefold())
            if not words:
                continue
            hashes = np.fromiter((h(w.encode("utf-8", "surrogatepass")) for w in words), np.uint64, len(words))
            rows.append(np.full(len(words), i, np.int64))
            buckets.append((hashes % np.uint64(self.dim)).astype(np.int64))
            signs.append(np.where(hashes >> np.uint64(63), -1.0, 1.0).astype(np.float32))
        out = np.zeros((len(texts), self.dim), np.float32)
        if rows:
            np.add.at(out, (np.concatenate(rows), np.concatenate(buckets)), np.concatenate(signs))
        return np.sign(out) * np.log1p(np.abs(out))  # 1 + log(tf), keeping the sign; 0 stays 0

    def close(self) -> None:
        pass


class ModelEmbedder:
    """The embedding model of `model=`, through the score stage's engine (L2-normalized vectors)."""

    kind = "model"

    def __init__(self, cfg: ForgeConfig) -> None:
        from forge.engine.config import EngineKind
        from forge.engine.tiny_model import resolve_model
        from forge.stages.score.backends import TransformersScorer, VllmScorer, check_engine

        check_engine(cfg.model.engine)
        path = resolve_model(cfg.model.name_or_path)
        batch = cfg.dedup.semantic.batch_tokens
        if cfg.model.engine == EngineKind.transformers:
            self.scorer: Any = TransformersScorer(path, "embed", batch)
        else:
            self.scorer = VllmScorer(cfg, path, "embed", batch)
        self.scorer.wait_ready()
        self.context = self.scorer.context or 512
        self.path = path

    def embed(self, texts: list[str]) -> np.ndarray:
        """One vector per text; a text longer than the model's context is cut to it (dedup
        compares beginnings: the rows that differ later are rarely duplicates)."""
        tokenizer = getattr(self.scorer, "tokenizer", None) or self.scorer.llm.get_tokenizer()
        cut = []
        for text in texts:
            if 3 * len(text) < self.context - 16:  # no character is more than 3 tokens
                cut.append(text)
                continue
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            # 16 tokens of room: a decoded cut can re-encode a little longer (a split character)
            cut.append(text if len(ids) < self.context - 16 else tokenizer.decode(ids[: self.context - 16]))
        vectors = self.scorer.embed(cut)
        return np.stack(vectors).astype(np.float32) if vectors else np.empty((0, 0), np.float32)

    def close(self) -> None:
        self.scorer.close()


def make_embedder(cfg: ForgeConfig) -> LexicalEmbedder | ModelEmbedder:
    if choose_embedder(cfg) == "lexical":
        return LexicalEmbedder(cfg.dedup.semantic.dim)
    return ModelEmbedder(cfg)


def idf(df: np.ndarray, rows: int) -> np.ndarray:
    """Smoothed inverse document frequency of each bucket (as scikit-learn's)."""
    return (np.log((1 + rows) / (1 + df.astype(np.float64))) + 1).astype(np.float32)


def weigh(vectors: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Stored vectors as compared: times the idf (lexical), L2-normalized (float32)."""
    v = np.asarray(vectors, dtype=np.float32)
    if weights is not None:
        v = v * weights
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(norm, 1e-12)
