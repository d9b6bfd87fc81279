"""The finish of a score run, once every shard is done (locally or in Slurm's finalize job): a
second pass over data/ that computes quantiles over the whole run, writes each pool
(`score.pools`, `quantile(q)` allowed) to pools/<name>/, the optional embeddings.npy, the score
histogram PNG and stats.json's `score` (tokens scored per second from engine-ready). A killed
finish is simply done again: pools/ is rebuilt from data/."""

from __future__ import annotations

import ast
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from forge.run.output import shard_files, write_atomic, write_json_atomic
from forge.schema import ConfigError
from forge.sweep.plots import pyplot, save_png

log = logging.getLogger("forge.stages.score")
PNG = "score_hist.png"


def _settings(out_dir: Path) -> dict[str, Any]:
    cfg = yaml.safe_load((out_dir / "config.yaml").read_text()) if (out_dir / "config.yaml").exists() else {}
    return (cfg or {}).get("score") or {}


def _column(out_dir: Path, name: str) -> np.ndarray:
    files = shard_files(out_dir / "data")
    parts = [pq.read_table(f, columns=[name]).column(name).to_numpy(zero_copy_only=False) for f in files]
    return np.concatenate(parts).astype(np.float64) if parts else np.empty(0)


def with_quantiles(name: str, expression: str, columns: set[str], value_of: Callable[[str, float], float]) -> str:
    """The expression with each `quantile(q)` replaced by value_of(column, q): the q-quantile,
    over the whole run, of the column it is compared with."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ConfigError(f"score.pools.{name}: {exc.msg} in {expression!r}") from None

    class Quantiles(ast.NodeTransformer):
        def visit_Compare(self, node: ast.Compare) -> ast.AST:  # noqa: N802 (ast's name)
            self.generic_visit(node)
            sides = [node.left, *node.comparators]
            cols = [s.id for s in sides if isinstance(s, ast.Name) and s.id in columns]
            for i, side in enumerate(sides):
                if isinstance(side, ast.Call) and getattr(side.func, "id", None) == "quantile":
                    if not cols or len(side.args) != 1 or not isinstance(side.args[0], ast.Constant):
                        raise ConfigError(f"score.pools.{name}: quantile(q) needs a number q and a column to compare")
                    q = float(side.args[0].value)
                    if not 0 <= q <= 1:
                        raise ConfigError(f"score.pools.{name}: quantile({q:g}): q must be in [0, 1]")
                    constant = ast.copy_location(ast.Constant(value_of(cols[0], q)), side)
                    if i == 0:
                        node.left = constant
                    else:
                        node.comparators[i - 1] = constant
            return node

    return ast.unparse(Quantiles().visit(tree))


def check_pools(pools: dict[str, str], schema: pa.Schema) -> None:
    """Every pool expression checked against the output schema before any row is scored (a bad
    expression must not wait for the finish pass to fail)."""
    from forge.stages.curate.pools import compile_pools

    resolved = {name: with_quantiles(name, expr, set(schema.names), lambda c, q: 0.0) for name, expr in pools.items()}
    compile_pools(resolved, schema, key="score.pools")


def _quantile(out_dir: Path) -> Callable[[str, float], float]:
    columns: dict[str, np.ndarray] = {}  # each column read once, however many pools use it

    def value_of(column: str, q: float) -> float:
        if column not in columns:
            columns[column] = _column(out_dir, column)
        values = columns[column]
        return float(np.nanquantile(values, q)) if len(values) else float("nan")

    return value_of


def write_pools(out_dir: Path, pools: dict[str, str]) -> dict[str, Any]:
    from forge.stages.curate.pools import compile_pools, pool_tables

    shutil.rmtree(out_dir / "pools", ignore_errors=True)
    files = shard_files(out_dir / "data")
    if not pools or not files:
        return {}
    schema = pq.read_schema(files[0])
    value_of = _quantile(out_dir)
    resolved = {name: with_quantiles(name, expr, set(schema.names), value_of) for name, expr in pools.items()}
    compiled = compile_pools(resolved, schema, key="score.pools")
    counts = dict.fromkeys(pools, 0)
    for f in files:
        for key, table in pool_tables(pq.read_table(f), compiled).items():
            name = key.split("/", 1)[1]
            if table.num_rows:
                (out_dir / key).mkdir(parents=True, exist_ok=True)
                write_atomic(out_dir / key / f.name, table)
                counts[name] += table.num_rows
    return {"counts": counts, "resolved": resolved}


def embedding_blocks(out_dir: Path) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, rows x dims float32 matrix) of each data/ file, one file in memory at a time."""
    for f in shard_files(out_dir / "data"):
        table = pq.read_table(f, columns=["id", "embedding"])
        if table.num_rows:
            values = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            yield table.column("id").to_pylist(), values.astype(np.float32).reshape(table.num_rows, -1)


def write_npy(out_dir: Path) -> int:
    """embeddings.npy (rows in data/ order), filled file by file through a memory map, and
    embeddings_ids.json."""
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in shard_files(out_dir / "data"))
    first = next(embedding_blocks(out_dir), None)
    dims = first[1].shape[1] if first else 0
    tmp = out_dir / ".embeddings.npy.tmp"
    matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dims))
    ids: list[str] = []
    for block_ids, block in embedding_blocks(out_dir):
        matrix[len(ids) : len(ids) + len(block_ids)] = block
        ids += block_ids
    matrix.flush()
    del matrix
    tmp.replace(out_dir / "embeddings.npy")
    write_json_atomic(out_dir / "embeddings_ids.json", ids)
    return len(ids)


def centroid_similarity(out_dir: Path) -> tuple[np.ndarray, int]:
    """Each row's cosine similarity to the mean embedding (two passes, a file at a time), and the
    dimensions."""
    total, count, dims = None, 0, 0
    for _, block in embedding_blocks(out_dir):
        total = block.sum(0, dtype=np.float64) if total is None else total + block.sum(0, dtype=np.float64)
        count, dims = count + len(block), block.shape[1]
    if not count or not np.linalg.norm(total):
        return np.empty(0), dims
    centroid = total / count
    parts = [
        block @ centroid / (np.linalg.norm(block, axis=1) * np.linalg.norm(centroid) + 1e-12)
        for _, block in embedding_blocks(out_dir)
    ]
    return np.concatenate(parts), dims


def plot(values: np.ndarray, label: str, bins: int, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(values):
        ax.hist(values[np.isfinite(values)], bins=bins, color="#4c72b0")
    ax.set_xlabel(label)
    ax.set_ylabel("rows")
    ax.set_title(f"score: {label}")
    fig.tight_layout()
    save_png(fig, path)


def _labels(out_dir: Path) -> dict[str, int]:
    """classify: rows per top label (none for a regression model)."""
    counts: dict[str, int] = {}
    for path in sorted((out_dir / "data").glob("*.parquet")):
        for value in pq.read_table(path, columns=["label"]).column("label").to_pylist():
            if value is not None:
                counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def add_report(out_dir: Path, stats: dict[str, Any]) -> None:
    s = _settings(out_dir)
    kind = s.get("kind", "nll")
    seconds = stats.get("score_seconds", 0) or 0
    report: dict[str, Any] = {
        "kind": kind,
        "scored_tokens": stats.get("scored_tokens", 0),
        "model_tokens": stats.get("model_tokens", 0),
        "seconds_from_engine_ready": round(seconds, 3),
        "scored_tokens_per_s": round(stats.get("scored_tokens", 0) / seconds, 1) if seconds else None,
        "model_tokens_per_s": round(stats.get("model_tokens", 0) / seconds, 1) if seconds else None,
    }
    if kind == "nll":
        values, label = _column(out_dir, "nll_mean"), "nll_mean (per scored token)"
        if len(values):
            report["nll_mean_quantiles"] = {
                str(q): round(float(np.quantile(values, q)), 6) for q in (0.1, 0.25, 0.5, 0.75, 0.9)
            }
    elif kind == "classify":
        values, label = _column(out_dir, "score"), "classifier score"
        if len(values):
            report["score_quantiles"] = {
                str(q): round(float(np.quantile(values, q)), 6) for q in (0.1, 0.25, 0.5, 0.75, 0.9)
            }
        labels = _labels(out_dir)
        if labels:
            report["labels"] = labels
    else:
        values, dims = centroid_similarity(out_dir)
        label = "cosine similarity to the mean embedding"
        report["dimensions"] = dims
        if s.get("npy"):
            report["npy_rows"] = write_npy(out_dir)
    try:
        plot(values, label, int(s.get("bins", 40)), out_dir / PNG)
        report["plot"] = PNG
    except Exception as exc:  # a figure never fails the run
        log.warning("score plot not written: %s", exc)
    pools = write_pools(out_dir, dict(s.get("pools") or {}))
    if pools:
        stats["pools"] = pools["counts"]
        report["pools_resolved"] = pools["resolved"]
    stats["score"] = report


def card_lines(stats: dict[str, Any]) -> list[str]:
    r = stats.get("score")
    if not r:
        return []
    lines = [
        "## Scores",
        "",
        f"`score.kind={r['kind']}`: {r['scored_tokens']:,} tokens scored ({r['model_tokens']:,} through the model) "
        f"in {r['seconds_from_engine_ready']} s from engine-ready: {r['scored_tokens_per_s']} scored tokens/s.",
        "",
    ]
    if r.get("nll_mean_quantiles"):
        lines += ["| quantile | nll_mean |", "|---:|---:|"]
        lines += [f"| {q} | {v} |" for q, v in r["nll_mean_quantiles"].items()]
        lines.append("")
    if r.get("score_quantiles"):
        lines += ["| quantile | score |", "|---:|---:|"]
        lines += [f"| {q} | {v} |" for q, v in r["score_quantiles"].items()]
        lines.append("")
    if r.get("labels"):
        lines += ["| label | rows |", "|---|---:|"]
        lines += [f"| {k} | {v:,} |" for k, v in r["labels"].items()]
        lines.append("")
    if r.get("pools_resolved"):
        lines += ["Pools, with each quantile computed over the whole run:", ""]
        lines += [f"- `{k}`: `{v}`" for k, v in r["pools_resolved"].items()]
        lines.append("")
    if r.get("plot"):
        lines += [f"![score histogram]({r['plot']})", ""]
    return lines
