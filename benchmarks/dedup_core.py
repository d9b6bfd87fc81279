"""WIP (issue 14): forge's in-memory dedup core vs datatrove 0.10.1's four MinHash stages on
LocalPipelineExecutor, same documents with planted near-copies, same 5-gram shingles and 112
hashes (datatrove: 14 buckets x 8, hash_fc=sha1 because its default xxhash path fails with
xxhash 4.x). Each side runs in its own process (peak RSS is that process's). Prints docs/s and
recall on the planted pairs. Not yet the real `pipeline=dedup` workflow (no files, no resume).

    python benchmarks/dedup_core.py [--docs 50000]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_docs(n: int, seed: int = 0) -> tuple[list[str], list[tuple[int, int]]]:
    rng = random.Random(seed)
    docs, pairs = [], []
    for _ in range(int(n * 0.9)):
        docs.append(" ".join(f"w{rng.randrange(200_000)}" for _ in range(rng.randint(100, 400))))
    for i in range(n - len(docs)):  # 10% near-copies: ~3% of words changed (5-gram Jaccard ~0.75-0.85)
        words = docs[i].split()
        for j in rng.sample(range(len(words)), max(1, len(words) // 40)):
            words[j] = f"x{rng.randrange(10**7)}"
        docs.append(" ".join(words))
        pairs.append((i, len(docs) - 1))
    return docs, pairs


def run_forge(docs: list[str]) -> tuple[set[int], dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import numpy as np

    from forge.dedup.clusters import candidate_pairs, keep_one, verified
    from forge.dedup.minhash import MinHasher, band_keys, connected_components

    t0 = time.perf_counter()
    mh = MinHasher(n_grams=5, num_hashes=112)
    sig = np.vstack([mh.signatures(docs[i : i + 2000]) for i in range(0, len(docs), 2000)])
    t1 = time.perf_counter()
    left, right = candidate_pairs(band_keys(sig, 14, 8))
    ok = verified(sig, left, right, 0.0)  # datatrove does not verify: the same candidates
    t2 = time.perf_counter()
    label = connected_components(len(docs), left[ok], right[ok])
    removed = {r.row for r in keep_one(label, sig, "first")}
    t3 = time.perf_counter()
    return removed, {"signatures_s": t1 - t0, "buckets_s": t2 - t1, "clusters_s": t3 - t2, "total_s": t3 - t0}


def run_datatrove(docs: list[str], work: Path) -> tuple[set[int], dict]:
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from loguru import logger

    logger.remove()
    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=HashConfig(hash_fc="sha1"))
    items = [Document(text=t, id=str(i)) for i, t in enumerate(docs)]
    times = {}
    t = time.perf_counter()
    LocalPipelineExecutor(
        [items, MinhashDedupSignature(str(work / "sigs"), config=cfg)], tasks=1, logging_dir=str(work / "l1")
    ).run()
    times["signatures_s"] = time.perf_counter() - t
    t = time.perf_counter()
    LocalPipelineExecutor(
        [MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=cfg)],
        tasks=cfg.num_buckets,
        logging_dir=str(work / "l2"),
    ).run()
    times["buckets_s"] = time.perf_counter() - t
    t = time.perf_counter()
    LocalPipelineExecutor(
        [MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=cfg)],
        tasks=1,
        logging_dir=str(work / "l3"),
    ).run()
    times["clusters_s"] = time.perf_counter() - t
    t = time.perf_counter()
    LocalPipelineExecutor(
        [
            items,
            MinhashDedupFilter(str(work / "remove"), exclusion_writer=JsonlWriter(str(work / "removed"))),
            JsonlWriter(str(work / "kept")),
        ],
        tasks=1,
        logging_dir=str(work / "l4"),
    ).run()
    times["filter_s"] = time.perf_counter() - t
    times["total_s"] = sum(times.values())
    import glob
    import gzip

    removed = set()
    for f in glob.glob(str(work / "removed" / "*")):
        with gzip.open(f, "rt") as fh:
            removed |= {int(json.loads(line)["id"]) for line in fh}
    return removed, times


def side(name: str, n: int) -> None:
    docs, pairs = make_docs(n)
    removed, times = run_forge(docs) if name == "forge" else run_datatrove(docs, Path(tempfile.mkdtemp()))
    recall = sum(b in removed or a in removed for a, b in pairs) / len(pairs)
    false = len(removed - {b for _, b in pairs} - {a for a, _ in pairs}) / (n - 2 * len(pairs))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "side": name,
                **times,
                "docs_s": n / times["total_s"],
                "recall": recall,
                "unrelated_removed": false,
                "peak_rss_mb": peak,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=50_000)
    ap.add_argument("--side")
    args = ap.parse_args()
    if args.side:
        side(args.side, args.docs)
        return
    results = {}
    for name in ("forge", "datatrove"):
        out = subprocess.run(
            [sys.executable, __file__, "--docs", str(args.docs), "--side", name],
            capture_output=True,
            text=True,
            check=True,
        )
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[name]))
    print(f"forge / datatrove end to end: {results['datatrove']['total_s'] / results['forge']['total_s']:.2f}x")


if __name__ == "__main__":
    main()
