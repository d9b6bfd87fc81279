"""dedup as a workflow of resumable steps over the whole input, before the filter:

1. signatures (one task per input shard): each row's exact hash, MinHash signature, band keys
   and keep-policy score, in files of dedup.signature_rows rows under state/dedup/signatures/;
2. buckets (one task per range of bands; the exact hash is one more band): rows sharing a band
   key, as chain edges between row numbers, each near-dup edge verified on the signatures;
3. clusters (one task): connected components over the edges, one row kept per cluster, the
   others written as removals per shard (state/dedup/clusters/removed_TTTTT.parquet);
4. filter: the batch stage of forge/stages/dedup/stage.py, run by forge/run/batch.py like any stage.

Rows are numbered by their place in the whole input stream (`MixedRow.index`), which does not
depend on the number of tasks: the result is the same with 1 task and with 200. Row g is in
shard g % tasks at position g // tasks, so a row's signature is found by arithmetic.

Each step writes its files atomically and then a marker per task (`TTTTT.done`): a kill leaves
whole files, a re-run skips every finished file and task. state/dedup/manifest.json pins the
settings the steps were made with; a re-run with other settings is refused (or, with
output.on_change=fresh, the old run is moved aside).

Memory: signatures and buckets hold one file or one band at a time (16 bytes per row for a band's
keys and row numbers); clusters hold only the rows that have an edge (a few arrays of 8 bytes
per such row and per edge), never one entry per input row.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from forge.config import ForgeConfig
from forge.io.mix import Mix
from forge.io.secrets import redact_strings
from forge.run.batch import batched
from forge.run.output import RunChanged, clean_temp_files, write_atomic, write_json_atomic
from forge.run.progress import LiveProgress
from forge.stages.dedup.minhash import MinHasher, band_keys, candidate_probability, connected_components
from forge.stages.dedup.stage import EXACT, NEAR, DedupStage, removals_path

log = logging.getLogger("forge.stages.dedup")
EDGE_BLOCK = 200_000  # edges verified at a time (bounds the gathered signatures to ~200 MB)
STEPS = ("signatures", "buckets", "clusters")
ROWS_SCHEMA = pa.schema(
    [
        ("gid", pa.int64()),  # the row's place in the input stream
        ("id", pa.string()),
        ("score", pa.float64()),  # dedup.keep's score: the highest stays
        ("exact_hi", pa.uint64()),  # xxh3-128 of the normalized compared text
        ("exact_lo", pa.uint64()),
        ("compared", pa.bool_()),  # false: unreadable, or nothing to compare (empty field)
    ]
)


class StepNotDone(RuntimeError):
    """The filter of a Slurm task started before the steps it needs finished."""


def _write_npy(fh: Any, array: np.ndarray) -> None:
    """`array` in np.save's format, written through Python's file object: numpy's own write
    (tofile) reports a short write as `N requested and M written`, without errno or file."""
    array = np.ascontiguousarray(array)
    np.lib.format.write_array_header_1_0(fh, np.lib.format.header_data_from_array_1_0(array))
    if array.size:
        fh.write(memoryview(array).cast("B"))


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Temp file, fsync, rename. A failed write (a full disk) removes the temp file and raises
    the OSError with `path` as its filename, which the runner prints as `<path>: No space left on
    device; free some space and re-run the same command to resume`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            _write_npy(fh, array)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None


def band_tasks(cfg: ForgeConfig) -> int:
    """Tasks of the buckets step: dedup.band_tasks, else one per band (the exact hash is one more)
    up to cluster.tasks."""
    m = cfg.dedup.minhash
    count = (m.layout()[0] if m.enabled else 0) + (1 if cfg.dedup.exact else 0)
    return cfg.dedup.band_tasks or max(1, min(cfg.cluster.tasks, count))


def planned_steps(cfg: ForgeConfig) -> list[tuple[str, int]]:
    """The steps and their task counts from the config alone: Slurm submits a recipe's dedup step
    before the step it reads has written anything."""
    return [("signatures", cfg.cluster.tasks), ("buckets", band_tasks(cfg)), ("clusters", 1)]


class Workflow:
    """The steps before dedup's filter, for one run dir (see the module docstring)."""

    def __init__(self, cfg: ForgeConfig, mix: Mix, stage: DedupStage, wanted: dict[str, Any]) -> None:
        self.cfg = cfg
        self.d = cfg.dedup
        self.mix = mix
        self.stage = stage
        self.wanted = json.loads(json.dumps(wanted, default=str))
        self.out = Path(cfg.output.dir)
        self.root = self.out / "state" / "dedup"
        self.tasks = cfg.cluster.tasks
        m = self.d.minhash
        self.hasher = MinHasher(m.n_grams, m.num_hashes, m.seed, m.char_ngrams) if m.enabled else None
        self.bands, self.rows_per_band = m.layout() if m.enabled else (0, 0)
        self.exact_band = self.bands if self.d.exact else None  # the exact hash: one more "band"
        self.band_count = self.bands + (1 if self.d.exact else 0)
        self.band_tasks = band_tasks(cfg)
        self.total: int | None = None  # rows of the whole input, when known (progress only)

    # the workflow, as the runner sees it
    def steps(self) -> list[tuple[str, int]]:
        return planned_steps(self.cfg)

    def marker(self, step: str, task: int) -> Path:
        return self.root / step / f"{task:05d}.done"

    def done(self, step: str, task: int) -> bool:
        return self.marker(step, task).exists()

    def check(self) -> None:
        """Refuse steps made with other settings (writes nothing)."""
        path = self.root / "manifest.json"
        if not path.exists():
            return
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if old != json.loads(json.dumps(redact_strings(self.wanted), default=str)):  # as written (masked)
            raise RunChanged(
                f"{self.out} holds dedup steps made with other settings or input ({path}). Re-run with "
                "output.on_change=fresh to move the old results aside and start over, or pick another output.dir."
            )

    def describe(self) -> str:
        m = self.d.minhash
        parts = [f"field {self.d.field!r}", f"keep={self.d.keep}"]
        if self.d.exact:
            parts.append("exact")
        if m.enabled:
            p = candidate_probability(m.threshold, self.bands, self.rows_per_band)
            parts.append(
                f"MinHash {m.num_hashes} hashes of {m.n_grams}-{'char' if m.char_ngrams else 'word'} shingles, "
                f"{self.bands} bands x {self.rows_per_band} rows (a pair at Jaccard {m.threshold} is a candidate "
                f"with probability {p:.3f}; candidates "
                f"verified at estimated Jaccard >= {m.threshold})"
            )
        return "dedup: " + ", ".join(parts)

    def run_all(self) -> None:
        """Every unfinished task of every step, in order (a local run)."""
        log.info("%s", self.describe())
        for step, count in self.steps():
            todo = [t for t in range(count) if not self.done(step, t)]
            if todo and len(todo) < count:
                log.info("dedup %s: %d of %d task(s) already done; resuming", step, count - len(todo), count)
            for task in todo:
                self.run(step, task)

    def require_done(self) -> None:
        for step, count in self.steps():
            missing = [t for t in range(count) if not self.done(step, t)]
            if missing:
                raise StepNotDone(
                    f"dedup step {step}: task(s) {missing[:10]} not finished in {self.root / step}; "
                    "re-run the same command to run them"
                )

    def run(self, step: str, task: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / "manifest.json").exists():
            write_json_atomic(self.root / "manifest.json", self.wanted)
        (self.root / step).mkdir(exist_ok=True)
        if step == "signatures":  # only this task's: the array's other tasks write theirs now
            clean_temp_files(self.root / step, f"{task:05d}_")
        elif step == "buckets":
            for band in range(task, self.band_count, self.band_tasks):
                clean_temp_files(self.root / step, f"band_{band:04d}.")
        else:
            clean_temp_files(self.root / step)
        if step != "signatures":
            self.require_before(step)
        t0 = time.monotonic()
        summary = getattr(self, f"_{step}")(task)
        summary["seconds"] = round(time.monotonic() - t0, 3)
        write_json_atomic(self.marker(step, task), summary)

    def require_before(self, step: str) -> None:
        for earlier, count in self.steps()[: STEPS.index(step)]:
            missing = [t for t in range(count) if not self.done(earlier, t)]
            if missing:
                raise StepNotDone(f"dedup step {step} needs {earlier} task(s) {missing[:10]} finished first")

    # 1. signatures
    def sig_files(self, task: int, k: int, kind: str) -> Path:
        return self.root / "signatures" / f"{task:05d}_{k:05d}.{kind}"

    def _signatures(self, task: int) -> dict[str, Any]:
        return self.file_step(task, "signatures", self._signature_file)

    def file_step(self, task: int, step: str, write_file: Any) -> dict[str, Any]:
        """A per-shard step: this task's rows in files of dedup.signature_rows rows, each made by
        `write_file(task, k, batch)` (which returns its compared rows and writes rows.parquet last),
        skipping the files an earlier session finished."""
        label = f"dedup {step} {task}" if self.tasks > 1 else f"dedup {step}"
        total = self.stage_rows(task)
        bar = LiveProgress(label, total or 0, 0, self.cfg.run.progress, self.cfg.run.log_every_s)
        bar.rows_per_s = True
        bar.start()
        rows = batches = compared = 0
        for k, batch in enumerate(batched(self.mix.rows(task, self.tasks), self.d.signature_rows)):
            batches, rows = k + 1, rows + len(batch)
            path = self.sig_files(task, k, "rows.parquet")
            if path.exists():  # written by an earlier session: the marker of the whole file set
                compared += pq.read_table(path, columns=["compared"]).column("compared").to_numpy().sum()
            else:
                compared += write_file(task, k, batch)
            bar.advance(docs=len(batch))
            bar.total = max(bar.total, bar.done)
            bar.poll()
        bar.total = bar.done
        log.info("%s", bar.line())
        return {"rows": rows, "files": batches, "compared": int(compared)}

    def rows_table(self, batch: list, prepared: list, texts: list[str], compared: np.ndarray) -> pa.Table:
        """rows.parquet of one file: each row's place, id, keep-policy score, exact hash of the
        compared text, and whether it is compared at all."""
        exact = [xxhash.xxh3_128_intdigest(t.encode("utf-8", "surrogatepass")) for t in texts]
        return pa.table(
            {
                "gid": pa.array([mr.index for mr in batch], pa.int64()),
                "id": [p.row["id"] if p.row else None for p in prepared],
                "score": pa.array([p.score for p in prepared], pa.float64()),
                "exact_hi": pa.array([h >> 64 for h in exact], pa.uint64()),
                "exact_lo": pa.array([h & 0xFFFFFFFFFFFFFFFF for h in exact], pa.uint64()),
                "compared": pa.array(compared),
            },
            schema=ROWS_SCHEMA,
        )

    def stage_rows(self, task: int) -> int | None:
        return None if self.total is None else len(range(task, self.total, self.tasks))

    def _signature_file(self, task: int, k: int, batch: list) -> int:
        prepared = [self.stage.prepare(mr) for mr in batch]
        texts = [p.text for p in prepared]
        compared = np.array([bool(p.text) for p in prepared], dtype=bool)
        if self.hasher is not None:
            sig = self.hasher.signatures(texts)
            _save_npy(self.sig_files(task, k, "sig.npy"), sig)
            keys = band_keys(sig, self.bands, self.rows_per_band)
            _save_npy(self.sig_files(task, k, "bands.npy"), np.ascontiguousarray(keys.T))  # band-major
        table = self.rows_table(batch, prepared, texts, compared)
        write_atomic(self.sig_files(task, k, "rows.parquet"), table)  # last: the file set is whole
        return int(compared.sum())

    def row_files(self) -> Iterator[tuple[int, int]]:
        """(task, file) of every signatures file, in order."""
        for task in range(self.tasks):
            files = json.loads(self.marker("signatures", task).read_text())["files"]
            for k in range(files):
                yield task, k

    def signatures_of(self, gids: np.ndarray) -> np.ndarray:
        """The signatures of rows `gids` (any order), read file by file through memory maps."""
        out = np.empty((len(gids), self.d.minhash.num_hashes), dtype=np.uint32)
        pos = gids // self.tasks
        where = (gids % self.tasks) * (1 << 40) + pos // self.d.signature_rows  # one number per file
        order = np.argsort(where, kind="stable")
        files, starts = np.unique(where[order], return_index=True)
        bounds = [*starts[1:], len(order)]
        for f, lo, hi in zip(files, starts, bounds, strict=True):
            idx = order[lo:hi]
            sig = np.load(self.sig_files(int(f >> 40), int(f & ((1 << 40) - 1)), "sig.npy"), mmap_mode="r")
            out[idx] = sig[pos[idx] % self.d.signature_rows]
        return out

    def agreement(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Estimated Jaccard of each pair: the share of hash functions on which they agree."""
        out = np.empty(len(left), dtype=np.float64)
        for lo in range(0, len(left), EDGE_BLOCK):
            a = self.signatures_of(left[lo : lo + EDGE_BLOCK])
            b = self.signatures_of(right[lo : lo + EDGE_BLOCK])
            out[lo : lo + EDGE_BLOCK] = (a == b).mean(axis=1)
        return out

    # 2. buckets
    def _band(self, band: int) -> tuple[np.ndarray, ...]:
        """(gids, keys...) of every compared row for one band."""
        gids, keys, lows = [], [], []
        for task, k in self.row_files():
            cols = ["gid", "compared"] + (["exact_hi", "exact_lo"] if band == self.exact_band else [])
            t = pq.read_table(self.sig_files(task, k, "rows.parquet"), columns=cols)
            mask = t.column("compared").to_numpy(zero_copy_only=False)
            gids.append(t.column("gid").to_numpy()[mask])
            if band == self.exact_band:
                keys.append(t.column("exact_hi").to_numpy()[mask])
                lows.append(t.column("exact_lo").to_numpy()[mask])
            else:
                keys.append(np.load(self.sig_files(task, k, "bands.npy"), mmap_mode="r")[band][mask])
        cat = [np.concatenate(x) if x else np.empty(0, np.uint64) for x in (keys, lows)]
        return np.concatenate(gids).astype(np.int64) if gids else np.empty(0, np.int64), *cat

    def _buckets(self, task: int) -> dict[str, Any]:
        candidates = verified = 0
        for band in range(task, self.band_count, self.band_tasks):
            path = self.root / "buckets" / f"band_{band:04d}.npy"
            if path.exists():
                continue
            gids, keys, lows = self._band(band)
            if band == self.exact_band:
                order = np.lexsort((gids, lows, keys))
                k, lo = keys[order], lows[order]
                same = (k[1:] == k[:-1]) & (lo[1:] == lo[:-1])
            else:
                order = np.lexsort((gids, keys))
                k = keys[order]
                same = k[1:] == k[:-1]
            g = gids[order]
            left, right = g[:-1][same], g[1:][same]  # a chain per bucket: k rows, k-1 edges
            candidates += len(left)
            if band != self.exact_band and len(left):
                ok = self.agreement(left, right) >= self.d.minhash.threshold
                left, right = left[ok], right[ok]
            verified += len(left)
            _save_npy(path, np.stack([left, right], axis=1).astype(np.int64))
        log.info("dedup buckets %d: %d candidate edges, %d verified (over its bands)", task, candidates, verified)
        # per band: a pair that shares several bands is counted in each (distinct pairs: clusters)
        return {"candidate_edges": int(candidates), "verified_edges": int(verified)}

    # 3. clusters
    def _clusters(self, task: int) -> dict[str, Any]:
        edges = [np.load(self.root / "buckets" / f"band_{b:04d}.npy") for b in range(self.band_count)]
        edges = np.concatenate(edges) if edges else np.empty((0, 2), np.int64)
        nodes = np.unique(edges)  # only rows with an edge: memory follows the duplicates, not the input
        left, right = np.searchsorted(nodes, edges[:, 0]), np.searchsorted(nodes, edges[:, 1])
        del edges
        # verified pairs: each pair of rows once, however many bands (and the exact hash) found it
        pairs = len(np.unique(np.minimum(left, right) * max(len(nodes), 1) + np.maximum(left, right)))
        label = connected_components(len(nodes), left, right)
        score, hi, lo, ids = self._attributes(nodes)
        # keeper of each cluster: the highest score, ties to the first row (lowest gid)
        ranked = np.lexsort((nodes, -score, label))
        first = np.ones(len(nodes), bool)
        first[1:] = label[ranked][1:] != label[ranked][:-1]
        keeper_at = np.empty(len(nodes), np.int64)  # for each node (by rank), its keeper's node index
        keeper_at[ranked] = ranked[first][np.cumsum(first) - 1]
        sizes = np.bincount(label, minlength=len(nodes))
        removed = np.nonzero(keeper_at != np.arange(len(nodes)))[0]
        keeper = keeper_at[removed]
        exact = (hi[removed] == hi[keeper]) & (lo[removed] == lo[keeper])
        jaccard = np.ones(len(removed))
        near = ~exact
        if near.any():
            jaccard[near] = self.agreement(nodes[removed[near]], nodes[keeper[near]])
        far = np.nonzero(jaccard < self.d.minhash.threshold)[0]
        if len(far):  # linked to the keeper only through other copies: compared with what stays
            keeper[far], jaccard[far] = self._far_rows(nodes, label, ranked, removed[far], keeper[far], jaccard[far])
            stays = keeper == removed
            removed, keeper, jaccard = removed[~stays], keeper[~stays], jaccard[~stays]
            exact = (hi[removed] == hi[keeper]) & (lo[removed] == lo[keeper])
            near = ~exact
        gids = nodes[removed]
        table = pa.table(
            {
                "gid": pa.array(gids, pa.int64()),
                "duplicate_of": pa.array(ids[keeper].tolist(), pa.string()),
                "duplicate_of_gid": pa.array(nodes[keeper], pa.int64()),
                "jaccard": pa.array(jaccard, pa.float64()),
                "kind": pa.array(np.where(exact, EXACT, NEAR).tolist(), pa.string()),
                "cluster_size": pa.array(sizes[label[removed]], pa.int64()),
            }
        )
        shard = gids % self.tasks
        for t in range(self.tasks):
            write_atomic(removals_path(self.out, t), table.filter(pa.array(shard == t)))
        cluster_sizes = sizes[sizes > 1]
        log.info(
            "dedup clusters: %d rows in %d clusters; %d exact and %d near copies to remove",
            len(nodes),
            len(cluster_sizes),
            int(exact.sum()),
            int(near.sum()),
        )
        histogram = {str(int(s)): int(n) for s, n in zip(*np.unique(cluster_sizes, return_counts=True), strict=True)}
        return {
            "verified_pairs": int(pairs),
            "clusters": len(cluster_sizes),
            "rows_in_clusters": int(cluster_sizes.sum()),
            "exact_duplicates": int(exact.sum()),
            "near_duplicates": int(near.sum()),
            "cluster_size_histogram": histogram,
            "largest_cluster": int(cluster_sizes.max()) if len(cluster_sizes) else 0,
        }

    def _far_rows(
        self,
        nodes: np.ndarray,
        label: np.ndarray,
        ranked: np.ndarray,
        far: np.ndarray,
        keeper: np.ndarray,
        j: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """A row whose estimated Jaccard with its cluster's keeper is below the threshold (a chain
        A~B~C where A and C differ) is removed only as a copy of a row that stays; otherwise it
        stays itself. Greedy in keep-policy order, within each cluster: (its new keeper, Jaccard),
        the keeper being the row itself when it stays."""
        rank = np.empty(len(nodes), np.int64)
        rank[ranked] = np.arange(len(nodes))
        order = np.lexsort((rank[far], label[far]))
        out_keeper, out_j = keeper.copy(), j.copy()
        sig_far = self.signatures_of(nodes[far])
        sig_keep = self.signatures_of(nodes[np.unique(keeper)])
        keep_row = {int(k): sig_keep[i] for i, k in enumerate(np.unique(keeper))}
        staying: dict[int, list[int]] = {}  # cluster -> rows that stay (the keeper first)
        threshold = self.d.minhash.threshold
        for i in order:
            cluster = int(label[far[i]])
            kept = staying.setdefault(cluster, [int(keeper[i])])
            sigs = np.stack([keep_row[k] for k in kept])
            agree = (sigs == sig_far[i]).mean(axis=1)
            best = int(np.argmax(agree))
            if agree[best] >= threshold:
                out_keeper[i], out_j[i] = kept[best], agree[best]
            else:
                out_keeper[i], out_j[i] = far[i], 1.0
                kept.append(int(far[i]))
                keep_row[int(far[i])] = sig_far[i]
        return out_keeper, out_j

    def _attributes(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """score, exact hash and id of the rows `nodes` (sorted), file by file."""
        score = np.empty(len(nodes), np.float64)
        hi = np.empty(len(nodes), np.uint64)
        lo = np.empty(len(nodes), np.uint64)
        ids = np.empty(len(nodes), dtype=object)
        if not len(nodes):
            return score, hi, lo, ids
        for task, k in self.row_files():
            t = pq.read_table(self.sig_files(task, k, "rows.parquet"))
            g = t.column("gid").to_numpy()
            at = np.searchsorted(nodes, g)
            mask = (at < len(nodes)) & (nodes[np.minimum(at, len(nodes) - 1)] == g)
            if not mask.any():
                continue
            where = at[mask]
            score[where] = t.column("score").to_numpy()[mask]
            hi[where] = t.column("exact_hi").to_numpy()[mask]
            lo[where] = t.column("exact_lo").to_numpy()[mask]
            ids[where] = np.asarray(t.column("id").to_pylist(), dtype=object)[mask]
        return score, hi, lo, ids
