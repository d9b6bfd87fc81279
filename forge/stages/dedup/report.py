"""dedup's part of stats.json and the card: what each step found, the cluster-size histogram
and its PNG (cluster_sizes.png in the run dir)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from forge.sweep.plots import pyplot, save_png

log = logging.getLogger("forge.stages.dedup")
PNG = "cluster_sizes.png"


def _markers(out_dir: Path, step: str) -> list[dict[str, Any]]:
    found = []
    for p in sorted((out_dir / "state" / "dedup" / step).glob("*.done")):
        try:
            found.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return found


def add_report(out_dir: Path, stats: dict[str, Any]) -> None:
    """stats["dedup"]: rows in, exact and near duplicates removed, clusters and their sizes, and
    the time of each step; kept rows per source are stats["by_source"]. Writes the PNG."""
    removed = stats.get("removed_by_filter") or {}
    clusters = (_markers(out_dir, "clusters") or [{}])[0]
    buckets = _markers(out_dir, "buckets")
    signatures = _markers(out_dir, "signatures")
    embeddings = _markers(out_dir, "embeddings")  # dedup.method=semantic
    histogram = clusters.get("cluster_size_histogram") or {}
    stats["dedup"] = {
        "method": "semantic" if embeddings else "minhash",
        "rows_in": stats.get("rows_in", 0),
        "rows_compared": sum(m.get("compared", 0) for m in signatures + embeddings),
        "exact_duplicates": removed.get("dedup_exact", 0),
        "near_duplicates": removed.get("dedup_near", 0) + removed.get("dedup_semantic", 0),
        "rows_kept": stats.get("rows_kept", 0),
        "clusters": clusters.get("clusters", 0),
        "rows_in_clusters": clusters.get("rows_in_clusters", 0),
        "largest_cluster": clusters.get("largest_cluster", 0),
        "cluster_size_histogram": histogram,
        "candidate_edges_over_bands": sum(m.get("candidate_edges", m.get("candidate_pairs", 0)) for m in buckets),
        "verified_edges_over_bands": sum(m.get("verified_edges", m.get("verified_pairs", 0)) for m in buckets),
        "verified_pairs": clusters.get("verified_pairs", 0),  # distinct pairs of rows, each once
        "step_seconds": {
            "signatures": round(sum(m.get("seconds", 0) for m in signatures), 3),
            "buckets": round(sum(m.get("seconds", 0) for m in buckets), 3),
            "clusters": clusters.get("seconds", 0),
        },
    }
    if embeddings:
        steps = ("embeddings", "kmeans", "assign", "pairs", "clusters")
        seconds = {s: round(sum(m.get("seconds", 0) for m in _markers(out_dir, s)), 3) for s in steps}
        kmeans = (_markers(out_dir, "kmeans") or [{}])[0]
        stats["dedup"].update(
            step_seconds=seconds,
            embedder=embeddings[0].get("embedder"),
            kmeans_clusters=kmeans.get("clusters", 0),
            similar_pairs=sum(m.get("pairs", 0) for m in _markers(out_dir, "pairs")),
        )
        for key in ("candidate_edges_over_bands", "verified_edges_over_bands"):
            stats["dedup"].pop(key)
    try:
        plot_cluster_sizes(histogram, out_dir / PNG)
        stats["dedup"]["plot"] = PNG
    except Exception as exc:  # a figure never fails the run
        log.warning("cluster-size plot not written: %s", exc)


def plot_cluster_sizes(histogram: dict[str, int], path: Path) -> None:
    plt = pyplot()
    sizes = sorted((int(k), v) for k, v in histogram.items())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if sizes:
        ax.bar([str(s) for s, _ in sizes], [n for _, n in sizes], color="#4c72b0")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no duplicates found", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("cluster size (rows that are copies of each other)")
    ax.set_ylabel("clusters")
    ax.set_title("dedup: cluster sizes")
    fig.tight_layout()
    save_png(fig, path)


def card_lines(stats: dict[str, Any]) -> list[str]:
    """The card's dedup section."""
    d = stats.get("dedup")
    if not d:
        return []
    semantic = d.get("method") == "semantic"
    near, measure = ("semantic", "`similarity` (cosine)") if semantic else ("near", "`jaccard` (estimated)")
    lines = [
        "## Deduplication",
        "",
        f"{d['rows_in']:,} rows in, {d['rows_compared']:,} compared: {d['exact_duplicates']:,} exact and "
        f"{d['near_duplicates']:,} {near} duplicates removed ({d['clusters']:,} clusters, the largest of "
        f"{d['largest_cluster']:,} rows); each removed row is in `rejected/` with `duplicate_of` (the id kept "
        f"in its place) and {measure}.",
        "",
        "| cluster size | clusters |",
        "|---:|---:|",
    ]
    lines += [f"| {s} | {n:,} |" for s, n in sorted(d["cluster_size_histogram"].items(), key=lambda kv: int(kv[0]))]
    lines.append("")
    if d.get("plot"):
        lines += [f"![cluster sizes]({d['plot']})", ""]
    return lines
