"""The dedup stage's row view and its last step, the filter.

Every row is first brought into the curated schema (forge/stages/curate/normalize.py: any source shape,
the same content id everywhere), so the signatures step and the filter see the same row. The
filter is an ordinary batch stage: forge/run/batch.py reads, shards, writes and resumes it; it only
looks each row up in the removals the clusters step wrote for its shard."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from forge.config import ForgeConfig
from forge.io.mix import Mix, MixedRow
from forge.run.batch import BatchResult, reject_row
from forge.schema import ConfigError
from forge.stages.curate.normalize import check_spec, meta_columns, normalize
from forge.stages.curate.rows import Unnormalizable, curated_schema, kept_table, row_text
from forge.stages.dedup.fields import FieldError, field_text

EXACT, NEAR, SEMANTIC = "dedup_exact", "dedup_near", "dedup_semantic"
REJECT_FIELDS = [
    pa.field("duplicate_of", pa.string()),  # the id of the row kept in its place
    pa.field("jaccard", pa.float64()),  # estimated Jaccard similarity with that row (1.0: exact)
]
SEMANTIC_REJECT_FIELDS = [
    pa.field("duplicate_of", pa.string()),
    pa.field("similarity", pa.float64()),  # cosine similarity of the two rows' embeddings
]


def removals_path(out_dir: Path, task: int) -> Path:
    return out_dir / "state" / "dedup" / "clusters" / f"removed_{task:05d}.parquet"


@dataclasses.dataclass
class Prepared:
    """One input row as dedup sees it: the curated row (None when it cannot be read or
    normalized: the filter quarantines it), the compared text and the keep policy's score."""

    row: dict[str, Any] | None
    text: str
    score: float
    error: tuple[str, str] | None = None  # (step, reason) of an unusable row


class DedupStage:
    """The rows as dedup compares them, and the filter of the last step."""

    name = "dedup"
    pilot = False  # a mix's pass-rate pilot cannot run before the clusters step
    reject_fields = REJECT_FIELDS

    def __init__(self, cfg: ForgeConfig, mix: Mix) -> None:
        self.cfg = cfg.dedup
        self.out_dir = Path(cfg.output.dir)
        self.tasks = cfg.cluster.tasks
        self.sources = mix.sources
        for s in self.sources:
            check_spec(s.spec, s.key)
        self.schema: pa.Schema = curated_schema(meta_columns([s.spec for s in self.sources]))
        labels = [s.label for s in self.sources]
        keep = self.cfg.keep
        if keep.startswith("meta_") and keep not in self.schema.names:
            metas = [n for n in self.schema.names if n.startswith("meta_")]
            raise ConfigError(f"dedup.keep: {keep!r} is not a column of these rows; their meta columns: {metas}")
        unknown = [p for p in self.cfg.source_priority if p not in labels]
        if unknown:
            raise ConfigError(f"dedup.source_priority: {unknown} are not sources of this run; its sources: {labels}")
        order = list(self.cfg.source_priority) + [x for x in labels if x not in self.cfg.source_priority]
        self.rank = [order.index(x) for x in labels]
        self._removed: tuple[int, dict[str, np.ndarray]] | None = None
        self.model = cfg.model.name_or_path
        self.embedder = ""
        if self.cfg.method == "semantic":
            from forge.stages.dedup.embedders import choose_embedder

            self.embedder = choose_embedder(cfg)
        self.measure = "similarity" if self.cfg.method == "semantic" else "jaccard"
        self.reject_fields = SEMANTIC_REJECT_FIELDS if self.cfg.method == "semantic" else REJECT_FIELDS

    def fingerprint(self) -> dict[str, Any]:
        settings = dataclasses.asdict(self.cfg)
        settings.pop("band_tasks")  # parallelism only: the same rows come out
        if self.cfg.method == "semantic":
            settings.pop("minhash")
            model = self.model if self.embedder == "model" else None
            return {"stage": self.name, "dedup": settings, "embedder": self.embedder, "model": model}
        settings.pop("semantic")
        settings.pop("method")  # a minhash run made before dedup.method existed keeps its fingerprint
        layout = self.cfg.minhash.layout() if self.cfg.minhash.enabled else None
        return {"stage": self.name, "dedup": settings, "lsh_layout": layout}

    def prepare(self, mr: MixedRow) -> Prepared:
        """The curated row, its compared text (normalized) and its score under dedup.keep."""
        if mr.row.record is None:
            return Prepared(None, "", 0.0, ("input", mr.row.error or "unreadable row"))
        try:
            row = normalize(mr.row.record, self.sources[mr.source].spec, mr.row.where)
        except Unnormalizable as exc:
            return Prepared(None, "", 0.0, ("normalize", str(exc)))
        if mr.copy:  # the k-th repeat of an up-sampled row has its own id (and is an exact copy)
            row["id"] = f"{row['id']}.{mr.copy}"
        try:
            text = field_text(row, self.cfg.field)
        except FieldError as exc:
            raise ConfigError(f"{exc} ({self.sources[mr.source].label}: {mr.row.where})") from None
        return Prepared(row, text, self._score(row, mr))

    def _score(self, row: dict[str, Any], mr: MixedRow) -> float:
        keep = self.cfg.keep
        if keep == "first":
            return -float(mr.index)
        if keep == "longest":
            return float(len(row_text(row)))
        if keep == "source":
            return -float(self.rank[mr.source])
        value = row.get(keep)
        try:
            number = float(value)
        except (TypeError, ValueError):
            return -math.inf
        return number if not math.isnan(number) else -math.inf

    def restore(self, kept: pa.Table | None) -> None:
        self._removed = None

    def _removals(self, task: int) -> dict[str, np.ndarray]:
        if self._removed is None or self._removed[0] != task:
            path = removals_path(self.out_dir, task)
            table = pq.read_table(path) if path.exists() else None
            cols = ("gid", "duplicate_of", self.measure, "kind", "cluster_size")
            arrays = {c: np.asarray(table.column(c).to_numpy(zero_copy_only=False)) for c in cols} if table else {}
            if not arrays:
                arrays = {"gid": np.empty(0, np.int64)}
            self._removed = (task, arrays)
        return self._removed[1]

    def process(self, rows: list[MixedRow]) -> BatchResult:
        removed = self._removals(rows[0].index % self.tasks) if rows else {"gid": np.empty(0, np.int64)}
        gids = np.fromiter((mr.index for mr in rows), dtype=np.int64, count=len(rows))
        at = np.searchsorted(removed["gid"], gids)
        hit = np.zeros(len(rows), bool)
        if len(removed["gid"]):
            hit = (at < len(removed["gid"])) & (removed["gid"][np.minimum(at, len(removed["gid"]) - 1)] == gids)
        kept, rejected = [], []
        by_source: dict[str, dict[str, Any]] = {}
        by_filter: dict[str, int] = {}
        for i, mr in enumerate(rows):
            label = self.sources[mr.source].label
            counts = by_source.setdefault(label, {"rows_in": 0, "rows_kept": 0, "chars_kept": 0, "removed": {}})
            counts["rows_in"] += 1
            p = self.prepare(mr)
            if p.error is not None:
                step, reason = p.error
                rejected.append(reject_row(mr, label, step, reason))
            elif hit[i]:
                j = int(at[i])
                step = str(removed["kind"][j])
                of, sim = str(removed["duplicate_of"][j]), float(removed[self.measure][j])
                size = int(removed["cluster_size"][j])
                if step == EXACT:
                    what = "exact copy"
                elif step == SEMANTIC:
                    what = f"semantic copy (cosine similarity {sim:.3f})"
                else:
                    what = f"near copy (estimated Jaccard {sim:.2f})"
                reason = f"{what} of {of}, kept in its place (cluster of {size} rows, dedup.keep={self.cfg.keep})"
                value = {"duplicate_of": of, self.measure: round(sim, 4), "cluster_size": size}
                row = reject_row(mr, label, step, reason, value, p.row["id"])
                rejected.append({**row, "duplicate_of": of, self.measure: sim})
            else:
                kept.append((p.row, mr))
                counts["rows_kept"] += 1
                counts["chars_kept"] += len(row_text(p.row))
                continue
            step = rejected[-1]["filter"]
            counts["removed"][step] = counts["removed"].get(step, 0) + 1
            by_filter[step] = by_filter.get(step, 0) + 1
        table = kept_table(kept, self.schema, self.sources, rejected, by_source, by_filter)
        counts_all = {
            "rows_kept": table.num_rows,
            "rows_removed": len(rejected),
            "removed_by_filter": by_filter,
            "by_source": by_source,
        }
        return BatchResult({"data": table}, rejected, counts_all)
