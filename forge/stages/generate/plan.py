"""From source rows to work: row identity, the input fingerprint, and the work items
(one per row and rollout) still to do. Pure and synchronous; the generator drives it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import xxhash

from forge.config import ForgeConfig
from forge.io.dataset import Source, SourceRow, is_run_dir
from forge.stages.generate.cache import request_key
from forge.stages.generate.generator import Reject, WorkItem, cache_identity, dump_prompt, request_body
from forge.stages.generate.prompt import LengthFitter, RowRejected, build


@dataclass
class Scan:
    rows: int = 0
    fingerprint: int = 0
    pending: dict[str, int] = field(default_factory=dict)  # row key -> units still to do

    @property
    def units(self) -> int:
        return sum(self.pending.values())


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def run_dir_id(record: dict[str, Any]) -> Any:
    """A row of an earlier forge run: `id`, then `#rollout` and `.output_index` when not 0."""
    key = record.get("id")
    if key is None:
        return None
    if record.get("rollout"):
        key = f"{key}#{record['rollout']}"
    if record.get("output_index"):
        key = f"{key}.{record['output_index']}"
    return key


def _identified(
    rows: Iterator[SourceRow], id_column: str | None, run_dir: bool = False
) -> Iterator[tuple[SourceRow, str, str | None]]:
    """(row, key, problem): key is the row id, or @source when the row has no usable id. Rows of
    a forge run dir are keyed by their own id (and rollout) unless dataset.id_column says."""
    seen: dict[str, str] = {}
    for row in rows:
        if row.record is None:
            yield row, f"@{row.where}", row.error
            continue
        if run_dir and id_column is None:  # never a position: it could equal another row's id
            value = run_dir_id(row.record)
            if value is None:
                yield row, f"@{row.where}", "the run dir's row has no id"
            elif str(value) in seen:
                yield row, f"@{row.where}", f"duplicate id {str(value)!r} (first at {seen[str(value)]})"
            else:
                seen[str(value)] = row.where
                yield row, str(value), None
            continue
        if id_column is None:
            yield row, str(row.index), None
            continue
        value = row.record.get(id_column)
        if value is None or (isinstance(value, str) and not value.strip()):
            yield row, f"@{row.where}", f"id ({id_column}) is missing"
        elif isinstance(value, (dict, list)):
            yield row, f"@{row.where}", f"id ({id_column}) is a {type(value).__name__}, not a scalar"
        elif not str(value).isprintable() and not _utf8(str(value)):
            yield row, f"@{row.where}", f"id ({id_column}) holds invalid Unicode"
        elif str(value) in seen:
            yield row, f"@{row.where}", f"duplicate id {str(value)!r} (first at {seen[str(value)]})"
        else:
            seen[str(value)] = row.where
            yield row, str(value), None


class Planner:
    def __init__(
        self, cfg: ForgeConfig, source: Source, task: int, tasks: int, template: str | None, whole_rows: bool = False
    ) -> None:
        """whole_rows: a rollout reads every column, so the fingerprint covers whole rows."""
        self.cfg = cfg
        self.source = source
        self.task = task
        self.tasks = tasks
        self.template = template
        self.whole_rows = whole_rows

    def _rows(self) -> Iterator[tuple[SourceRow, str, str | None]]:
        rows = self.source.rows(self.task, self.tasks)
        return _identified(rows, self.cfg.dataset.id_column, self.whole_rows and is_run_dir(self.cfg.dataset.name))

    def scan(self, done: set[tuple[str, int]], whole: set[str]) -> Scan:
        """Pass 1: count rows, fingerprint them (order-free: ids carry identity) and find what
        is left to do."""
        scan = Scan()
        rollouts = self.cfg.generation.rollouts
        pc = self.cfg.dataset.prompt_column
        acc = 0
        for row, key, _ in self._rows():
            scan.rows += 1
            if row.record is None:
                value: Any = row.error
            else:
                value = row.record if self.whole_rows else row.record.get(pc)
            text = value if isinstance(value, str) else dump_prompt(value, 1 << 30)
            blob = f"{key}\0{type(value).__name__}\0{text}".encode("utf-8", "surrogatepass")
            digest = xxhash.xxh64_intdigest(blob)
            acc = (acc + digest) & 0xFFFFFFFFFFFFFFFF
            if key in whole:
                continue
            left = sum((key, r) not in done for r in range(rollouts))
            if left:
                scan.pending[key] = left
        scan.fingerprint = acc
        return scan

    def mean_prompt_tokens(self, fitter: LengthFitter, sample: int = 64) -> int | None:
        """Mean prompt length over the first good rows, to size the in-flight limit."""
        if fitter.tok is None:
            return None
        lengths: list[int] = []
        for row, _, problem in self._rows():
            if problem is not None or row.record is None:
                continue
            try:
                built, _ = fitter.fit(
                    build(row.record.get(self.cfg.dataset.prompt_column), self.cfg.prompt, self.template)
                )
            except RowRejected:
                continue
            lengths.append(fitter.count(built))
            if len(lengths) >= sample:
                break
        return sum(lengths) // len(lengths) if lengths else None

    def plan(
        self,
        pending: dict[str, int],
        done: set[tuple[str, int]],
        fitter: LengthFitter,
        served_model: str,
        identity: dict[str, Any],
    ) -> Iterator[WorkItem | Reject]:
        """Pass 2: work for rows in `pending`; bad rows become Rejects with their reason."""
        cfg = self.cfg
        gen = cfg.generation
        pc = cfg.dataset.prompt_column
        keep = cfg.dataset.keep_columns
        for row, key, problem in self._rows():
            if key not in pending:
                continue
            raw = row.record.get(pc) if row.record is not None else None
            if problem is not None:
                stage = "input"
                reason = problem
            else:
                try:
                    built, truncated = fitter.fit(build(raw, cfg.prompt, self.template))
                except RowRejected as exc:
                    stage, reason = "prompt", str(exc)
                else:
                    stage = ""
            if stage:
                yield Reject(key, -1, stage, f"{row.where}: {reason}", source=row.where, prompt=dump_prompt(raw))
                continue
            messages = built.as_dicts()
            metadata = json.dumps({c: row.record.get(c) for c in keep}, default=str) if keep else None
            for rollout in range(gen.rollouts):
                if (key, rollout) in done:
                    continue
                body = request_body(messages, served_model, gen, rollout)
                ckey = request_key(cache_identity(body), identity, rollout)
                yield WorkItem(key, rollout, body, ckey, truncated, metadata)

    def rollouts(self, pending: dict[str, int], done: set[tuple[str, int]]) -> Iterator[Any]:
        """Pass 2 of a rollout run: one RolloutItem per row and sample left; bad rows are Rejects."""
        from forge.stages.generate.rollout.driver import RolloutItem

        keep = self.cfg.dataset.keep_columns
        for row, key, problem in self._rows():
            if key not in pending:
                continue
            if problem is not None:
                yield Reject(
                    key, -1, "input", f"{row.where}: {problem}", source=row.where, prompt=dump_prompt(row.record)
                )
                continue
            metadata = json.dumps({c: row.record.get(c) for c in keep}, default=str) if keep else None
            for sample in range(self.cfg.generation.rollouts):
                if (key, sample) not in done:
                    yield RolloutItem(key, sample, row.record, row.where, metadata)
