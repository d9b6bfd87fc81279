"""The tokenize stage's transformation of one batch: each row brought into the curated schema
(any source shape), then tokenized (documents) or rendered with the chat template and tokenized
with a loss mask (chats), in `tokenize.workers` processes. The batch's tokens go to data/ as one
Parquet chunk (id, source, num_tokens, tokens, mask); once every shard is done, the runner's finish
writes the trainer's shards from them (forge/stages/tokenize/shards.py)."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from forge.config import ForgeConfig
from forge.io.mix import Mix, MixedRow
from forge.run.batch import BatchResult, reject_row
from forge.schema import ConfigError
from forge.stages.curate.normalize import check_spec, normalize
from forge.stages.curate.rows import Unnormalizable
from forge.stages.tokenize.encode import Encoded, Encoder, RowError, TokenizerError

log = logging.getLogger("forge.stages.tokenize")
POOL_ROWS = 256  # rows per worker below which a batch is tokenized in this process


def tokenizer_name(cfg: ForgeConfig) -> str:
    """tokenize.tokenizer, else the model's tokenizer (the tiny model's by default: built offline)."""
    if cfg.tokenize.tokenizer:
        return cfg.tokenize.tokenizer
    if cfg.model.tokenizer:
        return cfg.model.tokenizer
    from forge.engine.tiny_model import resolve_model

    return resolve_model(cfg.model.name_or_path)


def schema(dtype: np.dtype) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),  # the row's token stream (stream_of: its source.dataset)
            ("num_tokens", pa.int32()),
            ("tokens", pa.list_(pa.from_numpy_dtype(dtype))),
            ("mask", pa.list_(pa.uint8())),  # 1: the token is trained on
        ]
    )


# one Encoder per worker process, built by the pool's initializer
_WORKER: dict[str, Any] = {}


def _init_worker(name: str, cfg: dict[str, Any], specs: list[Any], shard_tokens: int) -> None:
    from forge.stages.tokenize.config import TokenizeConfig

    _WORKER["encoder"] = Encoder(name, TokenizeConfig(**cfg))
    _WORKER["specs"] = specs
    _WORKER["shard_tokens"] = shard_tokens


# per row (id, encoded, step, reason, stream): encoded and its token stream, or the step and reason it failed at
Result = tuple[str | None, Encoded | None, str | None, str | None, str | None]


def _encode(rows: list[MixedRow]) -> list[Result]:
    return encode_rows(_WORKER["encoder"], _WORKER["specs"], rows, _WORKER["shard_tokens"])


def encode_rows(encoder: Encoder, specs: list[Any], rows: list[MixedRow], shard_tokens: int) -> list[Result]:
    """Per row (id, encoded, step, reason, stream): encoded with its token stream, or the step and
    reason it failed at."""
    out: list[Any] = [None] * len(rows)
    docs, chats = [], []
    for n, mr in enumerate(rows):
        if mr.row.record is None:
            out[n] = (None, None, "input", mr.row.error or "unreadable row", None)
            continue
        try:
            row = normalize(mr.row.record, specs[mr.source], mr.row.where)
        except Unnormalizable as exc:
            out[n] = (None, None, "normalize", str(exc), None)
            continue
        rid = row["id"] + (f".{mr.copy}" if mr.copy else "")
        (docs if row.get("text") is not None else chats).append((n, rid, row))
    if docs:
        for (n, rid, row), enc in zip(docs, encoder.documents([r["text"] for _, _, r in docs]), strict=True):
            out[n] = (rid, enc, None, None, stream_of(row))
    if chats:
        for (n, rid, row), enc in zip(chats, encoder.chats([r["messages"] for _, _, r in chats]), strict=True):
            if isinstance(enc, RowError):  # chat_template, or dropped_content (tokenize.on_dropped)
                out[n] = (rid, None, enc.step, str(enc), None)
            else:
                out[n] = (rid, enc, None, None, stream_of(row))
    for n, (rid, enc, *_) in enumerate(out):
        if enc is not None and len(enc.tokens) > shard_tokens:
            why = f"{len(enc.tokens)} tokens: longer than tokenize.shard_tokens={shard_tokens}"
            out[n] = (rid, None, "length", why, None)
    return out


def stream_of(row: dict[str, Any]) -> str | None:
    """The token stream a row goes to: its `source.dataset` (a mix source's label, or for a curated
    run dir as input the dataset each row came from, so a curated mix keeps its sources apart)."""
    return (row.get("source") or {}).get("dataset")


class TokenizeStage:
    name = "tokenize"
    # Parquet dictionary encoding only where it pays: token lists write 4x faster without it
    dictionary_columns = ["id", "source"]

    def __init__(self, cfg: ForgeConfig, mix: Mix) -> None:
        self.cfg = cfg.tokenize
        self.sources = mix.sources
        for s in self.sources:
            check_spec(s.spec, s.key)
        name = tokenizer_name(cfg)
        try:
            self.encoder = Encoder(name, self.cfg)
        except TokenizerError as exc:
            raise ConfigError(str(exc)) from None
        self.schema = schema(self.encoder.dtype)
        self.workers = self.cfg.workers or len(os.sched_getaffinity(0))
        self._pool: ProcessPoolExecutor | None = None
        self._name = name

    def fingerprint(self) -> dict[str, Any]:
        settings = dataclasses.asdict(self.cfg)
        settings.pop("workers")  # speed only: the same ids come out
        settings.pop("fast")
        if settings["on_dropped"] == "quarantine":
            settings.pop("on_dropped")  # the default: run dirs from before the knob still resume
        return {"stage": self.name, "tokenize": settings, "tokenizer": self.encoder.identity()}

    def restore(self, kept: pa.Table | None) -> None:
        pass

    def _encode(self, rows: list[MixedRow]) -> list[Any]:
        specs = [s.spec for s in self.sources]
        if self.workers <= 1 or len(rows) < POOL_ROWS * self.workers:  # small batches: no IPC
            return encode_rows(self.encoder, specs, rows, self.cfg.shard_tokens)
        if self._pool is None:
            ctx = multiprocessing.get_context("forkserver")
            init = (self._name, dataclasses.asdict(self.cfg), specs, self.cfg.shard_tokens)
            self._pool = ProcessPoolExecutor(self.workers, ctx, initializer=_init_worker, initargs=init)
        size = -(-len(rows) // self.workers)
        parts = [rows[i : i + size] for i in range(0, len(rows), size)]
        return [r for part in self._pool.map(_encode, parts) for r in part]

    def process(self, rows: list[MixedRow]) -> BatchResult:
        results = self._encode(rows)
        kept: list[tuple[str, str, Encoded]] = []
        rejected: list[dict[str, Any]] = []
        by_source: dict[str, dict[str, Any]] = {}
        by_filter: dict[str, int] = {}
        dropped: dict[str, int] = {}
        for mr, (rid, enc, step, reason, stream) in zip(rows, results, strict=True):
            label = self.sources[mr.source].label
            counts = by_source.setdefault(
                label, {"rows_in": 0, "rows_kept": 0, "tokens": 0, "loss_tokens": 0, "chars_kept": 0, "removed": {}}
            )
            counts["rows_in"] += 1
            if enc is None:
                rejected.append(reject_row(mr, label, step, reason, None, rid))
                counts["removed"][step] = counts["removed"].get(step, 0) + 1
                by_filter[step] = by_filter.get(step, 0) + 1
                continue
            kept.append((rid, stream or label, enc))
            if enc.dropped:  # tokenize.on_dropped=keep: kept, and counted
                for what in enc.dropped:
                    dropped[what] = dropped.get(what, 0) + 1
            counts["rows_kept"] += 1
            counts["tokens"] += len(enc.tokens)
            counts["loss_tokens"] += enc.loss_tokens()
            counts["chars_kept"] += 4 * len(enc.tokens)  # the mix's token targets count chars / 4
        table = self._table(kept)
        totals = {
            "rows_kept": len(kept),
            "rows_removed": len(rejected),
            "tokens": int(sum(len(e.tokens) for _, _, e in kept)),
            "loss_tokens": sum(c["loss_tokens"] for c in by_source.values()),
            "removed_by_filter": by_filter,
            "by_source": by_source,
        }
        if dropped:
            totals["kept_with_dropped_content"] = dropped
        return BatchResult({"data": table}, rejected, totals)

    def _table(self, kept: list[tuple[str, str, Encoded]]) -> pa.Table:
        lengths = np.fromiter((len(e.tokens) for _, _, e in kept), dtype=np.int32, count=len(kept))
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))
        empty_t = np.empty(0, self.encoder.dtype)
        tokens = np.concatenate([e.tokens for _, _, e in kept]) if kept else empty_t
        mask = np.ones(len(tokens), dtype=np.uint8)  # documents: every token; chats: their mask
        for (_, _, e), start in zip(kept, offsets.to_numpy()[:-1], strict=True):
            if e.mask is not None:
                mask[start : start + len(e.mask)] = e.mask
        return pa.Table.from_arrays(
            [
                pa.array([k for k, _, _ in kept], pa.string()),
                pa.array([s for _, s, _ in kept], pa.string()),
                pa.array(lengths),
                pa.ListArray.from_arrays(offsets, pa.array(tokens)),
                pa.ListArray.from_arrays(offsets, pa.array(mask)),
            ],
            schema=self.schema,
        )
