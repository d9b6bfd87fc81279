"""The score stage's transformation of one batch: each row brought into the curated schema, then

- nll: tokenized with the loss mask of the tokenize stage (forge/stages/tokenize/encode.py: one
  implementation), the model's log-probability of every token given the ones before, and over
  the masked tokens `nll_sum`, `nll_mean`, `n_scored_tokens`, and per assistant turn (each run of
  masked tokens) `turn_nll_sum` and `turn_tokens`. A row longer than the context is scored in
  windows that each repeat `score.overlap` tokens of context (or quarantined);
- embed: the chosen view of the row (the conversation, its user turns or its answers) embedded.

Scores are added as columns to the curated row; everything else (reading, shards, resume,
rejected/, stats, Slurm) is the batch runner's.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from forge.config import ForgeConfig
from forge.io.mix import Mix, MixedRow
from forge.run.batch import BatchResult, reject_row
from forge.schema import ConfigError
from forge.stages.curate.normalize import check_spec, meta_columns, normalize
from forge.stages.curate.rows import Unnormalizable, curated_schema
from forge.stages.tokenize.config import TokenizeConfig
from forge.stages.tokenize.encode import Encoder, RowError, TokenizerError

log = logging.getLogger("forge.stages.score")
NLL_FIELDS = [
    pa.field("nll_sum", pa.float64()),
    pa.field("nll_mean", pa.float64()),
    pa.field("n_scored_tokens", pa.int64()),
    pa.field("turn_nll_sum", pa.list_(pa.float64())),  # per assistant turn (run of scored tokens)
    pa.field("turn_tokens", pa.list_(pa.int64())),
]


PER_TOKEN_FIELDS = [
    pa.field("scored_token_ids", pa.list_(pa.int64())),  # score.per_token: each scored token, in order
    pa.field("token_nll", pa.list_(pa.float64())),  # and its NLL
]


def view_text(row: dict[str, Any], view: str) -> str:
    """What score.kind=embed embeds: a document's text, or a chat's turns (all, user, assistant)."""
    if row.get("text") is not None:
        return row["text"]
    roles = {"conversation": None, "user": ("user",), "assistant": ("assistant",)}[view]
    parts = [
        (f"{m['role']}: " if roles is None else "") + (m.get("content") or "")
        for m in row.get("messages") or []
        if roles is None or m.get("role") in roles
    ]
    return "\n\n".join(parts)


def windows(length: int, size: int, overlap: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored target) of each window over a sequence of `length` tokens: each
    target t (1 <= t < length) is scored exactly once, with >= overlap tokens of context after
    the first window."""
    out, start, first = [], 0, 1
    while True:
        end = min(start + size, length)
        out.append((start, end, first))
        if end == length:
            return out
        first = end
        start = end - overlap


def turn_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    if not len(mask):
        return []
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


class ScoreStage:
    name = "score"
    pilot = False  # a mix's pass-rate pilot would load the model before the run is accepted

    def __init__(self, cfg: ForgeConfig, mix: Mix) -> None:
        self.cfg = cfg.score
        self.forge_cfg = cfg
        self.sources = mix.sources
        for s in self.sources:
            check_spec(s.spec, s.key)
        self.head: Any = None
        if self.cfg.kind == "classify":  # the classifier group, not `model=`
            from forge.stages.score.classify import choose_engine, classify_fields, read_head, resolve_classifier

            classifier = cfg.classifier
            self.model_path = resolve_classifier(classifier)
            self.head = read_head(self.model_path, classifier.trust_remote_code)
            if classifier.score_label is not None and classifier.score_label not in self.head.labels:
                raise ConfigError(
                    f"classifier.score_label={classifier.score_label!r}: not a label of {classifier.name_or_path}; "
                    f"its labels: {self.head.labels or '(none: a regression model)'}"
                )
            choose_engine(classifier, self.model_path)  # refuses vllm for a checkpoint it cannot run
            self.encoder = None
            extra = classify_fields(self.head)
        else:
            extra = self._model_setup(cfg)
        self.schema = curated_schema(meta_columns([s.spec for s in self.sources]))
        for f in extra:
            self.schema = self.schema.append(f)
        from forge.stages.score.report import check_pools

        check_pools(dict(self.cfg.pools), self.schema)
        self.scorer: Any = None

    def _model_setup(self, cfg: ForgeConfig) -> list[pa.Field]:
        """nll and embed: the `model=` checkpoint, its tokenizer and the columns it adds."""
        from forge.engine.tiny_model import resolve_model
        from forge.stages.score.backends import check_engine

        check_engine(cfg.model.engine)  # before the run is accepted
        self.model_path = resolve_model(cfg.model.name_or_path)
        tok = cfg.model.tokenizer or self.model_path
        key = "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path"
        try:
            mask_cfg = TokenizeConfig(mask=self.cfg.mask, reasoning=self.cfg.reasoning, eos=False)
            self.encoder = Encoder(tok, mask_cfg, stage="score", tokenizer_key=key)
        except TokenizerError as exc:
            raise ConfigError(str(exc)) from None
        extra = NLL_FIELDS if self.cfg.kind == "nll" else [pa.field("embedding", pa.list_(pa.float32()))]
        if self.cfg.kind == "nll" and self.cfg.per_token:
            extra = [*extra, *PER_TOKEN_FIELDS]
        return extra

    def fingerprint(self) -> dict[str, Any]:
        if self.cfg.kind == "classify":
            settings = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k in ("kind", "view")}
            classifier = dataclasses.asdict(self.forge_cfg.classifier)
            for key in ("engine", "batch_tokens", "gpu_memory_utilization"):  # speed only
                classifier.pop(key)
            return {"stage": self.name, "score": settings, "classifier": classifier}
        settings = dataclasses.asdict(self.cfg)
        for key in ("batch_tokens", "pools", "bins", "npy"):  # speed, or the finish pass only
            settings.pop(key)
        return {"stage": self.name, "score": settings, "model": self.forge_cfg.model.name_or_path}

    def restore(self, kept: pa.Table | None) -> None:
        pass

    def _load(self) -> None:
        """Start the engine (vLLM starts on a thread of its own while the first batch is read and
        tokenized)."""
        if self.scorer is None:
            self.t_load = time.monotonic()
            if self.cfg.kind == "classify":
                from forge.stages.score.classify import make_classifier

                self.scorer = make_classifier(
                    self.forge_cfg.classifier, self.model_path, self.forge_cfg.generation.seed
                )
            else:
                from forge.stages.score.backends import make_scorer

                self.scorer = make_scorer(self.forge_cfg, self.model_path)
            self.ready = False

    def _wait_ready(self) -> None:
        if not self.ready:
            self.scorer.wait_ready()
            wanted = self.cfg.max_len or self.forge_cfg.model.max_model_len or self.scorer.context or 4096
            self.max_len = min(wanted, self.scorer.context or wanted)
            self.mark = time.monotonic()  # engine-ready: batch k's seconds run from batch k-1's end
            self.ready = True
            log.info("score: %s ready in %.1f s (max_len %d)", self.model_path, self.mark - self.t_load, self.max_len)

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
            self.scorer = None

    def process(self, rows: list[MixedRow]) -> BatchResult:
        return self.submit(rows)()

    def submit(self, rows: list[MixedRow]) -> Callable[[], BatchResult]:
        """Prepare the batch and hand it to the engine; the returned call waits for the scores
        and builds the batch's result. The runner submits batch k+1 before it waits for batch
        k, so the GPU is never idle while forge reads, templates and tokenizes."""
        self._load()
        ok: list[tuple[MixedRow, dict[str, Any]]] = []
        rejected: list[dict[str, Any]] = []
        for mr in rows:
            label = self.sources[mr.source].label
            if mr.row.record is None:
                rejected.append(reject_row(mr, label, "input", mr.row.error or "unreadable row"))
                continue
            try:
                ok.append((mr, normalize(mr.row.record, self.sources[mr.source].spec, mr.row.where)))
            except Unnormalizable as exc:
                rejected.append(reject_row(mr, label, "normalize", str(exc)))
        kinds = {"nll": self._nll, "embed": self._embed, "classify": self._classify}
        finish = kinds[self.cfg.kind](ok, rejected)

        def result() -> BatchResult:
            kept, tokens = finish()
            now = time.monotonic()
            seconds, self.mark = now - self.mark, now
            return self._result(rows, kept, rejected, tokens, seconds)

        return result

    def _result(self, rows: list, kept: list, rejected: list, tokens: dict[str, int], seconds: float) -> BatchResult:
        by_source: dict[str, dict[str, Any]] = {}
        for mr in rows:
            c = by_source.setdefault(self.sources[mr.source].label, {"rows_in": 0, "rows_kept": 0, "removed": {}})
            c["rows_in"] += 1
        by_filter: dict[str, int] = {}
        for r in rejected:
            by_filter[r["filter"]] = by_filter.get(r["filter"], 0) + 1
            rem = by_source[r["source"]]["removed"]
            rem[r["filter"]] = rem.get(r["filter"], 0) + 1
        # every input row is kept or rejected once; a kept row's `source.dataset` is its origin's
        # label (a run dir read as input keeps it), not this run's source
        for c in by_source.values():
            c["rows_kept"] = c["rows_in"] - sum(c["removed"].values())
        counts = {
            "rows_kept": len(kept),
            "rows_removed": len(rejected),
            "removed_by_filter": by_filter,
            "by_source": by_source,
            "scored_tokens": tokens["scored"],
            "model_tokens": tokens["model"],
            "score_seconds": round(seconds, 6),
        }
        return BatchResult({"data": pa.Table.from_pylist(kept, schema=self.schema)}, rejected, counts)

    def _nll(self, ok: list, rejected: list) -> Callable[[], tuple[list[dict[str, Any]], dict[str, int]]]:
        docs = [(mr, row) for mr, row in ok if row.get("text") is not None]
        chats = [(mr, row) for mr, row in ok if row.get("text") is None]
        encoded: list[tuple[MixedRow, dict[str, Any], np.ndarray, np.ndarray]] = []
        for (mr, row), enc in zip(docs, self.encoder.documents([r["text"] for _, r in docs]), strict=True):
            encoded.append((mr, row, enc.tokens, np.ones(len(enc.tokens), np.uint8)))
        for (mr, row), enc in zip(chats, self.encoder.chats([r["messages"] for _, r in chats]), strict=True):
            if isinstance(enc, RowError):
                label = self.sources[mr.source].label
                rejected.append(reject_row(mr, label, "chat_template", str(enc), None, row["id"]))
            else:
                encoded.append((mr, row, enc.tokens, enc.mask))
        self._wait_ready()
        seqs, plan = [], []
        for mr, row, toks, mask in encoded:
            label = self.sources[mr.source].label
            if len(toks) < 2:
                why = "fewer than 2 tokens: nothing to score"
                rejected.append(reject_row(mr, label, "length", why, None, row["id"]))
                continue
            if len(toks) > self.max_len and self.cfg.on_long == "quarantine":
                why = f"{len(toks)} tokens: longer than score.max_len={self.max_len} (score.on_long=quarantine)"
                rejected.append(reject_row(mr, label, "length", why, None, row["id"]))
                continue
            parts = windows(len(toks), self.max_len, min(self.cfg.overlap, self.max_len - 1))
            plan.append((mr, row, toks, mask, parts, len(seqs)))
            seqs += [toks[a:b] for a, b, _ in parts]
        pending = self.scorer.submit_logprobs(seqs) if seqs else None

        def finish() -> tuple[list[dict[str, Any]], dict[str, int]]:
            logprobs = pending.result() if pending is not None else []
            out, scored, model = [], 0, 0
            for mr, row, toks, mask, parts, at in plan:
                lp = np.empty(len(toks) - 1)
                for k, (a, b, first) in enumerate(parts):
                    lp[first - 1 : b - 1] = logprobs[at + k][first - a - 1 :]
                    model += b - a
                target = mask[1:].astype(bool)
                nll = -lp[target]
                if not len(nll):
                    why = "no token to score (score.mask)"
                    rejected.append(reject_row(mr, self.sources[mr.source].label, "mask", why, None, row["id"]))
                    continue
                runs = turn_runs(mask[1:])
                scored += len(nll)
                scores = {
                    "nll_sum": float(nll.sum()),
                    "nll_mean": float(nll.mean()),
                    "n_scored_tokens": len(nll),
                    "turn_nll_sum": [float(-lp[a:b].sum()) for a, b in runs],
                    "turn_tokens": [b - a for a, b in runs],
                }
                if self.cfg.per_token:
                    scores["scored_token_ids"] = toks[1:][target].tolist()
                    scores["token_nll"] = nll.tolist()
                out.append({**row, **scores})
            return out, {"scored": scored, "model": model}

        return finish

    def _embed(self, ok: list, rejected: list) -> Callable[[], tuple[list[dict[str, Any]], dict[str, int]]]:
        texts = [view_text(row, self.cfg.view) for _, row in ok]
        self._wait_ready()
        lengths = self.scorer.count(texts) if texts else []
        keep, keep_texts = [], []
        for (mr, row), text, n in zip(ok, texts, lengths, strict=True):
            label = self.sources[mr.source].label
            if not text.strip():
                why = f"nothing to embed in score.view={self.cfg.view}"
                rejected.append(reject_row(mr, label, "view", why, None, row["id"]))
            elif n > self.max_len:
                why = f"{n} tokens: longer than score.max_len={self.max_len}"
                rejected.append(reject_row(mr, label, "length", why, None, row["id"]))
            else:
                keep.append((row, n))
                keep_texts.append(text)
        pending = self.scorer.submit_embed(keep_texts) if keep_texts else None

        def finish() -> tuple[list[dict[str, Any]], dict[str, int]]:
            vectors = pending.result() if pending is not None else []
            out = [{**row, "embedding": v.tolist()} for (row, _), v in zip(keep, vectors, strict=True)]
            tokens = sum(n for _, n in keep)
            return out, {"scored": tokens, "model": tokens}

        return finish

    def _classify(self, ok: list, rejected: list) -> Callable[[], tuple[list[dict[str, Any]], dict[str, int]]]:
        from forge.stages.score.classify import outputs_to_columns

        texts = [view_text(row, self.cfg.view) for _, row in ok]
        self._wait_ready()
        keep, keep_texts = [], []
        for (mr, row), text in zip(ok, texts, strict=True):
            if not text.strip():
                why = f"nothing to classify in score.view={self.cfg.view}"
                rejected.append(reject_row(mr, self.sources[mr.source].label, "view", why, None, row["id"]))
            else:
                keep.append(row)
                keep_texts.append(text)
        seqs = self.scorer.tokenize(keep_texts) if keep_texts else []
        pending = self.scorer.submit(seqs) if seqs else None
        score_label = self.forge_cfg.classifier.score_label

        def finish() -> tuple[list[dict[str, Any]], dict[str, int]]:
            raw = pending.result() if pending is not None else np.empty((0, 1))
            columns = outputs_to_columns(raw, self.head, score_label)
            out = [{**row, **c} for row, c in zip(keep, columns, strict=True)]
            tokens = sum(len(s) for s in seqs)
            return out, {"scored": tokens, "model": tokens}

        return finish
