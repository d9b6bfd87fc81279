"""Semantic dedup (dedup.method=semantic) as resumable steps before dedup's filter, the way
NeMo Curator's SemDeDup works (embed -> k-means -> cosine within clusters), with MinHash dedup's
keep policies, audit trail and resume:

1. embeddings (one task per input shard): each row's exact hash, keep-policy score and embedding
   (float16), in files of dedup.signature_rows rows under state/dedup/embeddings/ (the lexical
   embedder also counts each bucket's document frequency per file, for its idf);
2. kmeans (one task): spherical k-means (torch; on the GPU when there is one) trained on up to
   kmeans_sample rows spread over the input: state/dedup/kmeans/centroids.npy;
3. assign (one task per input shard): each row's nearest centroid;
4. pairs (tasks over k-means clusters): within each cluster, every pair of rows at cosine
   >= threshold, as edges (row, row, similarity); clusters are taken in groups of at most
   pair_rows rows, so the step's memory is bounded by that (or the largest cluster);
5. clusters (one task): in keep-policy order, a row is removed when a row that stays is its
   duplicate (the most similar such row is `duplicate_of`), so every removed row has a kept row at
   cosine >= threshold: no chains. Removals are written per shard for the filter, as MinHash's.

Each step's files are written atomically with a marker per task: a kill redoes at most one file.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from forge.config import ForgeConfig
from forge.io.mix import Mix
from forge.run.output import clean_temp_files, write_atomic, write_json_atomic
from forge.run.progress import LiveProgress
from forge.stages.dedup.embedders import choose_embedder, idf, make_embedder, weigh
from forge.stages.dedup.stage import EXACT, SEMANTIC, DedupStage, removals_path
from forge.stages.dedup.steps import StepNotDone, Workflow, _save_npy
from forge.stages.dedup.steps import planned_steps as minhash_steps

log = logging.getLogger("forge.stages.dedup")
STEPS = ("embeddings", "kmeans", "assign", "pairs", "clusters")
PAIR_BLOCK = 2048  # rows whose similarities to a whole cluster are computed at once
PER_TASK = ("embeddings", "assign")  # steps with one task per input shard


def planned_steps(cfg: ForgeConfig) -> list[tuple[str, int]]:
    """The steps and their task counts, from the config alone (Slurm submits them up front)."""
    if cfg.dedup.method != "semantic":
        return minhash_steps(cfg)
    t = cfg.cluster.tasks
    return [("embeddings", t), ("kmeans", 1), ("assign", t), ("pairs", t), ("clusters", 1)]


def workflow(cfg: ForgeConfig, mix: Mix, stage: DedupStage, wanted: dict[str, Any]) -> Workflow:
    """The dedup workflow of dedup.method (the registry's `workflow` hook)."""
    if cfg.dedup.method == "semantic":
        return SemanticWorkflow(cfg, mix, stage, wanted)
    return Workflow(cfg, mix, stage, wanted)


def kmeans(x: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    """Spherical k-means (cosine) of unit rows x: k unit centroids. torch, on the GPU if present;
    k-means++ seeding (on at most 20,000 of the rows) with the seed; an empty cluster takes the
    row farthest from its centroid."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    k = max(1, min(k, len(data)))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    seeds = data[torch.randperm(len(data), generator=gen)[:20_000].to(device)]
    centroids = seeds[torch.randint(len(seeds), (1,), generator=gen).to(device)]
    closest = (2 - 2 * (seeds @ centroids.T)[:, 0]).clamp_min(0)  # squared distance to the nearest centroid
    while len(centroids) < k:
        if float(closest.sum()) <= 0:
            pick = torch.randint(len(seeds), (1,), generator=gen).to(device)
        else:
            pick = torch.multinomial(closest.cpu(), 1, generator=gen).to(device)
        centroids = torch.cat([centroids, seeds[pick]])
        closest = torch.minimum(closest, (2 - 2 * (seeds @ seeds[pick].T)[:, 0]).clamp_min(0))
    for _ in range(iters):
        best, label = (data @ centroids.T).max(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, label, data)
        counts = torch.bincount(label, minlength=k)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            sums[empty] = data[torch.argsort(best)[: len(empty)]]
        new = torch.nn.functional.normalize(sums, dim=1)
        done = torch.allclose(new, centroids, atol=1e-6)
        centroids = new
        if done:
            break
    return centroids.cpu().numpy().astype(np.float32)


class SemanticWorkflow(Workflow):
    """The semantic dedup steps for one run dir (see the module docstring)."""

    def __init__(self, cfg: ForgeConfig, mix: Mix, stage: DedupStage, wanted: dict[str, Any]) -> None:
        super().__init__(cfg, mix, stage, wanted)
        self.s = cfg.dedup.semantic
        self.embedder_kind = choose_embedder(cfg)
        self.threshold = self.s.cutoff(self.embedder_kind)
        self._embedder: Any = None
        self._weights: np.ndarray | None | bool = False  # False: not read yet

    def steps(self) -> list[tuple[str, int]]:
        return planned_steps(self.cfg)

    def describe(self) -> str:
        s = self.s
        what = (
            f"lexical (hashed TF-IDF, {s.dim} dims)" if self.embedder_kind == "lexical" else self.cfg.model.name_or_path
        )
        k = s.clusters or f"one per {s.cluster_rows} rows"
        return (
            f"dedup: semantic, field {self.d.field!r}, keep={self.d.keep}, embeddings of {what}, k-means ({k}), "
            f"duplicates at cosine >= {self.threshold} within a k-means cluster"
        )

    def run(self, step: str, task: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / "manifest.json").exists():
            write_json_atomic(self.root / "manifest.json", self.wanted)
        (self.root / step).mkdir(exist_ok=True)
        clean_temp_files(self.root / step, f"{task:05d}_" if step in PER_TASK or step == "pairs" else "")
        if step != STEPS[0]:
            for earlier, count in self.steps()[: STEPS.index(step)]:
                missing = [t for t in range(count) if not self.done(earlier, t)]
                if missing:
                    raise StepNotDone(f"dedup step {step} needs {earlier} task(s) {missing[:10]} finished first")
        t0 = time.monotonic()
        try:
            summary = getattr(self, f"_{step}")(task)
        finally:
            if self._embedder is not None:
                self._embedder.close()
                self._embedder = None
        summary["seconds"] = round(time.monotonic() - t0, 3)
        write_json_atomic(self.marker(step, task), summary)

    # files
    def sig_files(self, task: int, k: int, kind: str) -> Path:
        step = "assign" if kind == "assign.npy" else "embeddings"
        return self.root / step / f"{task:05d}_{k:05d}.{kind}"

    def row_files(self):  # noqa: ANN201 - an iterator of (task, file)
        for task in range(self.tasks):
            files = json.loads(self.marker("embeddings", task).read_text())["files"]
            for k in range(files):
                yield task, k

    def weights(self) -> np.ndarray | None:
        """The lexical embedder's idf (from the kmeans step's file); None for a model."""
        if self._weights is False:
            path = self.root / "kmeans" / "idf.npy"
            self._weights = np.load(path) if path.exists() else None
        return self._weights  # type: ignore[return-value]

    # 1. embeddings
    def _embeddings(self, task: int) -> dict[str, Any]:
        return {**self.file_step(task, "embeddings", self._embedding_file), "embedder": self.embedder_kind}

    def _embedding_file(self, task: int, k: int, batch: list) -> int:
        prepared = [self.stage.prepare(mr) for mr in batch]
        texts = [p.text for p in prepared]
        compared = np.array([bool(t) for t in texts], dtype=bool)
        if self._embedder is None:
            self._embedder = make_embedder(self.cfg)
        chosen = [t[: self.s.max_chars] for t, c in zip(texts, compared, strict=True) if c]
        vectors = self._embedder.embed(chosen) if chosen else np.empty((0, 0), np.float32)
        dim = vectors.shape[1] if len(chosen) else (self.s.dim if self.embedder_kind == "lexical" else 0)
        full = np.zeros((len(batch), dim), np.float16)
        if len(chosen):
            full[compared] = vectors.astype(np.float16)
        _save_npy(self.sig_files(task, k, "emb.npy"), full)
        if self.embedder_kind == "lexical":
            _save_npy(self.sig_files(task, k, "df.npy"), (full[compared] != 0).sum(axis=0).astype(np.int64))
        table = self.rows_table(batch, prepared, texts, compared)
        write_atomic(self.sig_files(task, k, "rows.parquet"), table)  # last: the file set is whole
        return int(compared.sum())

    def _compared(self, task: int, k: int) -> np.ndarray:
        t = pq.read_table(self.sig_files(task, k, "rows.parquet"), columns=["compared"])
        return t.column("compared").to_numpy(zero_copy_only=False)

    def _vectors(self, task: int, k: int) -> np.ndarray:
        return np.load(self.sig_files(task, k, "emb.npy"), mmap_mode="r")

    # 2. kmeans
    def _kmeans(self, task: int) -> dict[str, Any]:
        files = list(self.row_files())
        counts = [int(self._compared(t, k).sum()) for t, k in files]
        total = sum(counts)
        weights = None
        if self.embedder_kind == "lexical" and files:
            df = sum(np.load(self.sig_files(t, k, "df.npy")) for t, k in files)
            weights = idf(df, total)
            _save_npy(self.root / "kmeans" / "idf.npy", weights)
            self._weights = weights
        k_wanted = self.s.clusters or max(1, math.ceil(total / self.s.cluster_rows))
        stride = max(1, math.ceil(total / self.s.kmeans_sample))
        gids, sample = [], []  # rows with gid % stride == 0, in gid order: the same with any cluster.tasks
        for (t, k), n in zip(files, counts, strict=True):
            if not n:
                continue
            g = pq.read_table(self.sig_files(t, k, "rows.parquet"), columns=["gid"]).column("gid").to_numpy()
            take = np.flatnonzero(self._compared(t, k) & (g % stride == 0))
            if len(take):
                gids.append(g[take])
                sample.append(weigh(self._vectors(t, k)[take], weights))
        if not sample:
            centroids = np.zeros((1, 1), np.float32)
        else:
            x = np.concatenate(sample)[np.argsort(np.concatenate(gids), kind="stable")]
            centroids = kmeans(x, k_wanted, self.s.kmeans_iters, self.s.seed)
        _save_npy(self.root / "kmeans" / "centroids.npy", centroids)
        log.info(
            "dedup kmeans: %d clusters of %d compared rows (trained on %d)",
            len(centroids),
            total,
            sum(len(s) for s in sample),
        )
        return {"clusters": len(centroids), "rows": total, "trained_on": int(sum(len(s) for s in sample))}

    # 3. assign
    def _assign(self, task: int) -> dict[str, Any]:
        """Each row's nearest centroid, and its second when that is within `border` cosine of the
        nearest (a row near a cluster border is compared in both clusters): (rows, 2) int32, -1 = none."""
        centroids = np.load(self.root / "kmeans" / "centroids.npy")
        files = json.loads(self.marker("embeddings", task).read_text())["files"]
        second = 0
        for k in range(files):
            path = self.sig_files(task, k, "assign.npy")
            if path.exists():
                second += int((np.load(path)[:, 1] >= 0).sum())
                continue
            compared = self._compared(task, k)
            label = np.full((len(compared), 2), -1, np.int32)
            rows = np.flatnonzero(compared)
            for lo in range(0, len(rows), 65536):
                part = rows[lo : lo + 65536]
                sims = weigh(self._vectors(task, k)[part], self.weights()) @ centroids.T
                if sims.shape[1] == 1:
                    label[part, 0] = 0
                    continue
                top = np.argpartition(-sims, 1, axis=1)[:, :2]
                top_sims = np.take_along_axis(sims, top, axis=1)
                flip = top_sims[:, 1] > top_sims[:, 0]
                top[flip] = top[flip][:, ::-1]
                top_sims[flip] = top_sims[flip][:, ::-1]
                label[part, 0] = top[:, 0]
                near = top_sims[:, 0] - top_sims[:, 1] <= self.s.border
                label[part[near], 1] = top[near, 1]
            second += int((label[:, 1] >= 0).sum())
            _save_npy(path, label)
        return {"files": files, "rows_in_two_clusters": second}

    # 4. pairs
    def _cluster_sizes(self) -> np.ndarray:
        k = len(np.load(self.root / "kmeans" / "centroids.npy", mmap_mode="r"))
        sizes = np.zeros(k, np.int64)
        for t, f in self.row_files():
            label = np.load(self.sig_files(t, f, "assign.npy")).ravel()
            sizes += np.bincount(label[label >= 0], minlength=k)
        return sizes

    def groups(self, task: int, sizes: np.ndarray) -> list[list[int]]:
        """This task's k-means clusters (every tasks-th), in groups of at most pair_rows rows."""
        mine = [c for c in range(task, len(sizes), self.tasks) if sizes[c] > 1]
        out: list[list[int]] = []
        held = 0
        for c in mine:
            if out and held + sizes[c] <= self.s.pair_rows:
                out[-1].append(c)
                held += int(sizes[c])
            else:
                out.append([c])
                held = int(sizes[c])
        return out

    def _pairs(self, task: int) -> dict[str, Any]:
        edges = compared = 0
        sizes = self._cluster_sizes()
        groups = self.groups(task, sizes)
        label = f"dedup pairs {task}" if self.tasks > 1 else "dedup pairs"
        # progress in rows compared (a group's cost grows with its clusters' sizes)
        total = int(sum(sizes[c] for g in groups for c in g))
        bar = LiveProgress(label, total, 0, self.cfg.run.progress, self.cfg.run.log_every_s)
        bar.rows_per_s = True
        bar.start()
        for g, clusters in enumerate(groups):
            path = self.root / "pairs" / f"{task:05d}_{g:05d}.npy"
            if path.exists():
                edges += len(np.load(path, mmap_mode="r"))
            else:
                found, n = self._group_pairs(clusters)
                compared += n
                edges += len(found)
                _save_npy(path, found)
            bar.advance(docs=int(sum(sizes[c] for c in clusters)))
            bar.poll()
        log.info(
            "%s; %d k-means cluster group(s), %d pairs at cosine >= %s", bar.line(), len(groups), edges, self.threshold
        )
        return {"groups": len(groups), "pairs": int(edges), "rows_compared": int(compared)}

    def _group_pairs(self, clusters: list[int]) -> tuple[np.ndarray, int]:
        """(left gid, right gid, similarity) of each pair at or above the threshold. Exact copies
        (the same hash) are compared once: the first row of each hash stands for the others,
        which get an edge to it at 1.0 (n copies give n - 1 edges, not n^2 / 2)."""
        wanted = np.asarray(clusters, np.int32)
        parts: list[tuple[np.ndarray, ...]] = []
        for t, f in self.row_files():
            both = np.load(self.sig_files(t, f, "assign.npy"))
            table = None
            for col in (0, 1):
                rows = np.flatnonzero(np.isin(both[:, col], wanted))
                if not len(rows):
                    continue
                if table is None:
                    table = pq.read_table(self.sig_files(t, f, "rows.parquet"), columns=["gid", "exact_hi", "exact_lo"])
                cols = [table.column(c).to_numpy()[rows] for c in ("gid", "exact_hi", "exact_lo")]
                parts.append((*cols, weigh(self._vectors(t, f)[rows], self.weights()), both[rows, col]))
        if not parts:
            return np.empty((0, 3), np.float64), 0
        gid, hi, lo, vec, label = (np.concatenate([p[i] for p in parts]) for i in range(5))
        out = []
        for c in clusters:
            members = np.flatnonzero(label == c)
            members = members[np.argsort(gid[members], kind="stable")]  # the same order with any cluster.tasks
            _, first, inverse = np.unique(
                np.stack([hi[members], lo[members]], axis=1), axis=0, return_index=True, return_inverse=True
            )
            inverse = inverse.ravel()
            copies = np.flatnonzero(first[inverse] != np.arange(len(members)))
            if len(copies):
                rep = members[first[inverse[copies]]]
                out.append(np.stack([gid[rep], gid[members[copies]], np.ones(len(copies))], axis=1))
            reps = members[np.sort(first)]
            m_gid, m_vec = gid[reps], vec[reps]
            for lo_ in range(0, len(reps), PAIR_BLOCK):
                sims = m_vec[lo_ : lo_ + PAIR_BLOCK] @ m_vec.T
                i, j = np.nonzero(sims >= self.threshold - 1e-6)
                i = i + lo_
                upper = j > i
                i, j = i[upper], j[upper]
                if len(i):
                    out.append(np.stack([m_gid[i], m_gid[j], np.minimum(sims[i - lo_, j], 1.0)], axis=1))
        found = np.concatenate(out) if out else np.empty((0, 3), np.float64)
        return found.astype(np.float64), len(gid)

    # 5. clusters
    def _clusters(self, task: int) -> dict[str, Any]:
        parts = [np.load(p) for p in sorted((self.root / "pairs").glob("*.npy"))]
        edges = np.concatenate(parts) if parts else np.empty((0, 3), np.float64)
        if len(edges):  # a pair of border rows is found in both their clusters: once each
            pairs = np.sort(edges[:, :2], axis=1)
            _, first = np.unique(pairs, axis=0, return_index=True)
            edges = np.concatenate([pairs[first], edges[first, 2:]], axis=1)
        left, right, sim = edges[:, 0].astype(np.int64), edges[:, 1].astype(np.int64), edges[:, 2]
        nodes = np.unique(np.concatenate([left, right]))
        score, hi, lo, ids = self._attributes(nodes)
        rank_order = np.lexsort((nodes, -score))  # keep-policy order: the highest score, then the first row
        rank = np.empty(len(nodes), np.int64)
        rank[rank_order] = np.arange(len(nodes))
        a, b = np.searchsorted(nodes, left), np.searchsorted(nodes, right)
        # each edge from the later-ranked row to the earlier one
        later = np.where(rank[a] > rank[b], a, b)
        earlier = np.where(rank[a] > rank[b], b, a)
        order = np.argsort(later, kind="stable")
        later, earlier, s = later[order], earlier[order], sim[order]
        starts = np.searchsorted(later, np.arange(len(nodes)))
        ends = np.searchsorted(later, np.arange(len(nodes)), side="right")
        kept = np.ones(len(nodes), bool)
        keeper = np.arange(len(nodes))
        similarity = np.ones(len(nodes))
        for u in rank_order:
            lo_, hi_ = starts[u], ends[u]
            if lo_ == hi_:
                continue
            cand, cs = earlier[lo_:hi_], s[lo_:hi_]
            ok = kept[cand]
            if ok.any():
                best = int(np.argmax(np.where(ok, cs, -np.inf)))
                kept[u], keeper[u], similarity[u] = False, cand[best], cs[best]
        removed = np.flatnonzero(~kept)
        kk = keeper[removed]
        exact = (hi[removed] == hi[kk]) & (lo[removed] == lo[kk]) & self.d.exact
        sizes = np.bincount(kk, minlength=len(nodes)) + 1  # a kept row and the rows removed for it
        table = pa.table(
            {
                "gid": pa.array(nodes[removed], pa.int64()),
                "duplicate_of": pa.array(ids[kk].tolist(), pa.string()),
                "duplicate_of_gid": pa.array(nodes[kk], pa.int64()),
                "similarity": pa.array(np.where(exact, 1.0, similarity[removed]), pa.float64()),
                "kind": pa.array(np.where(exact, EXACT, SEMANTIC).tolist(), pa.string()),
                "cluster_size": pa.array(sizes[kk], pa.int64()),
            }
        )
        table = table.sort_by("gid")
        shard = table.column("gid").to_numpy() % self.tasks
        for t in range(self.tasks):
            write_atomic(removals_path(self.out, t), table.filter(pa.array(shard == t)))
        groups = sizes[np.unique(kk)] if len(kk) else np.empty(0, np.int64)
        histogram = {str(int(x)): int(n) for x, n in zip(*np.unique(groups, return_counts=True), strict=True)}
        log.info(
            "dedup clusters: %d pairs; %d exact and %d semantic copies to remove",
            len(edges),
            int(exact.sum()),
            int((~exact).sum()),
        )
        return {
            "verified_pairs": len(edges),
            "clusters": len(groups),
            "rows_in_clusters": int(groups.sum()),
            "exact_duplicates": int(exact.sum()),
            "near_duplicates": int((~exact).sum()),
            "cluster_size_histogram": histogram,
            "largest_cluster": int(groups.max()) if len(groups) else 0,
        }
