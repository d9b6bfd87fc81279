"""The curate stage's transformation of one batch: normalize each row into the one schema,
run the filters in order, drop exact duplicates within the shard, and sort kept rows into pools.
It opens no file and counts no progress: forge/run/batch.py does that for every stage."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pyarrow as pa

from forge.config import ForgeConfig
from forge.io.mix import Mix, MixedRow
from forge.run.batch import BatchResult, reject_row
from forge.stages.curate.filters import build_filters, set_vocab_warmup
from forge.stages.curate.normalize import check_spec, meta_columns, normalize
from forge.stages.curate.pools import compile_pools, pool_tables
from forge.stages.curate.rows import Unnormalizable, curated_schema, kept_table, row_text

log = logging.getLogger("forge.stages.curate")
DEDUP = "dedup_exact"


def tokenizer_name(cfg: ForgeConfig) -> str | None:
    """curate.tokenizer, else the model's tokenizer, only when a filter counts tokens."""
    if not any(str(e.get("name")) == "role_tokens" for e in cfg.curate.filters):
        return None
    if cfg.curate.tokenizer:
        return cfg.curate.tokenizer
    from forge.engine.tiny_model import resolve_model  # the tiny model is built only when it is asked for

    return cfg.model.tokenizer or resolve_model(cfg.model.name_or_path)


class CurateStage:
    """normalize -> filters -> exact dedup -> pools, over a batch of mixed rows."""

    name = "curate"

    def __init__(self, cfg: ForgeConfig, mix: Mix) -> None:
        self.cfg = cfg.curate
        self.sources = mix.sources
        for s in self.sources:
            check_spec(s.spec, s.key)
        self.schema: pa.Schema = curated_schema(meta_columns([s.spec for s in self.sources]))
        set_vocab_warmup(self.cfg.vocab_warmup_rows)
        self.filters = build_filters(list(self.cfg.filters), tokenizer_name(cfg))
        self.pools = compile_pools(dict(self.cfg.pools), self.schema)
        self.masking = [f for f in self.filters if getattr(f, "action", None) == "redact"]
        self.seen: set[str] = set()

    def fingerprint(self) -> dict[str, Any]:
        settings = dataclasses.asdict(self.cfg)
        settings.pop("vocab_warmup_rows")  # speed only: the same rows come out
        return {"stage": self.name, "curate": settings}

    def restore(self, kept: pa.Table | None) -> None:
        self.seen = set(kept.column("id").to_pylist()) if kept is not None and self.cfg.dedup_exact else set()

    def process(self, rows: list[MixedRow]) -> BatchResult:
        kept: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        by_source: dict[str, dict[str, Any]] = {}
        removed: dict[str, int] = {}
        for mr in rows:
            src = self.sources[mr.source]
            label = src.label
            counts = by_source.setdefault(label, {"rows_in": 0, "rows_kept": 0, "chars_kept": 0, "removed": {}})
            counts["rows_in"] += 1
            row, step, reason, value, rid = self._verdict(mr, src)
            if step is None:
                kept.append((row, mr))
                counts["rows_kept"] += 1
                counts["chars_kept"] += len(row_text(row))  # for token targets and shares (chars / 4)
                continue
            for f in self.masking:  # a redacted run keeps no PII in rejected/'s raw rows either
                record = f.redact_value(mr.row.record)
                mr, value = (
                    dataclasses.replace(mr, row=dataclasses.replace(mr.row, record=record)),
                    f.redact_value(value),
                )
            rejected.append(reject_row(mr, label, step, reason, value, rid))
            counts["removed"][step] = counts["removed"].get(step, 0) + 1
            removed[step] = removed.get(step, 0) + 1
        table = self._table(kept, rows, rejected, by_source, removed)
        pools = pool_tables(table, self.pools)
        own = {f.name: c for f in self.filters if (c := f.batch_counts())}
        counts: dict[str, Any] = {
            "rows_kept": table.num_rows,
            "rows_removed": len(rejected),
            "removed_by_filter": removed,
            "by_source": by_source,
            "pools": {name.split("/", 1)[1]: t.num_rows for name, t in pools.items()},
        }
        if own:
            counts["filters"] = own
        return BatchResult({"data": table, **pools}, rejected, counts)

    def _table(self, kept: list, rows: list, rejected: list, by_source: dict, removed: dict) -> pa.Table:
        return kept_table(kept, self.schema, self.sources, rejected, by_source, removed)

    def _verdict(self, mr: MixedRow, src: Any) -> tuple[dict | None, str | None, str, Any, str | None]:
        """(row, None, ...) when kept; else (None, step, reason, value, id) for rejected/."""
        if mr.row.record is None:
            return None, "input", mr.row.error or "unreadable row", None, None
        try:
            row = normalize(mr.row.record, src.spec, mr.row.where)
        except Unnormalizable as exc:
            return None, "normalize", str(exc), None, None
        if mr.copy:  # the k-th repeat of an up-sampled row: its own id, never a duplicate
            row["id"] = f"{row['id']}.{mr.copy}"
        rid = row["id"]
        kind = "documents" if row.get("text") is not None else "chats"
        for f in self.filters:
            if f.applies_to != "all" and f.applies_to != kind:
                continue
            removal = f.check(row)
            if removal is not None:
                return None, removal.filter, removal.reason, removal.value, rid
        if self.cfg.dedup_exact:
            if rid in self.seen:
                return None, DEDUP, "the same content was kept earlier in this shard", rid, rid
            self.seen.add(rid)
        return row, None, "", None, rid
