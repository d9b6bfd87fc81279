"""forge's whole dedup pipeline vs datatrove 0.10.1's four MinHash stages, side by side in one run.

Same documents (forge/stages/dedup/planted.py: >= 200,000 with near-copies planted at Jaccard ~0.9, ~0.8
and ~0.6 and exact variants, in two JSONL sources), same shingles (word 5-grams) and hash count
(112: datatrove's 14 buckets x 8 hashes), one process per side, one worker each:

- forge: the real CLI, `forge pipeline=dedup dataset.sources=[a, b]` (threshold 0.7), every step
  and the filter writing Parquet, as a user runs it;
- datatrove: JsonlReader -> MinhashDedupSignature, MinhashDedupBuckets (14 tasks),
  MinhashDedupCluster, JsonlReader -> MinhashDedupFilter -> JsonlWriter, on LocalPipelineExecutor.
  datatrove's default hash (xxhash) fails with xxhash 4.x ("Strings must be encoded before
  hashing"), so it runs with HashConfig(hash_fc="sha1"), its other built-in choice.

Prints per step seconds and docs/s, end to end docs/s, peak RSS (of the side's process tree),
recall on the planted pairs at or above 0.7 and the share of unrelated documents removed, and
the ratio forge / datatrove.

    python benchmarks/dedup.py [--docs 200000] [--work /tmp/dedup_bench]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from forge.stages.dedup.planted import evaluate, removed_in_run, write  # noqa: E402

THRESHOLD = 0.7


def run_forge(data: Path, work: Path) -> dict:
    out = work / "forge_out"
    shutil.rmtree(out, ignore_errors=True)
    sources = f"dataset.sources=[{{name:{data / 'a.jsonl'},label:a}},{{name:{data / 'b.jsonl'},label:b}}]"
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "forge.cli", "pipeline=dedup", sources, f"output.dir={out}", "run.progress=false",
         f"dedup.minhash.threshold={THRESHOLD}", "output.examples_per_chunk=20000"],
        cwd=work, check=True, capture_output=True, text=True,
    )  # fmt: skip
    total = time.perf_counter() - t0
    stats = json.loads((out / "stats.json").read_text())
    steps = dict(stats["dedup"]["step_seconds"])
    task = json.loads((out / "stats" / "task_00000.json").read_text())
    steps["filter"] = sum(s["seconds"] for s in task["sessions"])
    return {"steps_s": steps, "total_s": total, "removed": removed_in_run(out)}


def run_datatrove(data: Path, work: Path) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from loguru import logger

    logger.remove()
    w = work / "datatrove"
    shutil.rmtree(w, ignore_errors=True)
    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=HashConfig(hash_fc="sha1"))

    def reader() -> JsonlReader:
        return JsonlReader(str(data), glob_pattern="*.jsonl")

    steps = {}
    t_all = time.perf_counter()
    stages = [
        ("signatures", [reader(), MinhashDedupSignature(str(w / "sigs"), config=cfg)], 1),
        ("buckets", [MinhashDedupBuckets(str(w / "sigs"), str(w / "buckets"), config=cfg)], cfg.num_buckets),
        ("clusters", [MinhashDedupCluster(str(w / "buckets"), str(w / "remove"), config=cfg)], 1),
        (
            "filter",
            [
                reader(),
                MinhashDedupFilter(str(w / "remove"), exclusion_writer=JsonlWriter(str(w / "removed"))),
                JsonlWriter(str(w / "kept")),
            ],
            1,
        ),
    ]
    for name, pipeline, tasks in stages:
        t = time.perf_counter()
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=str(w / f"logs_{name}")).run()
        steps[name] = time.perf_counter() - t
    total = time.perf_counter() - t_all
    removed = {}
    for f in glob.glob(str(w / "removed" / "*")):
        with gzip.open(f, "rt") as fh:
            for line in fh:
                removed[json.loads(line)["id"]] = None
    return {"steps_s": steps, "total_s": total, "removed": removed}


def side(name: str, data: Path, work: Path, docs: int) -> None:
    result = run_forge(data, work) if name == "forge" else run_datatrove(data, work)
    truth = json.loads((data / "truth.json").read_text())
    quality = evaluate(result.pop("removed"), truth, docs, THRESHOLD)
    peak = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    )
    result["docs_per_s"] = {k: round(docs / v, 1) for k, v in result["steps_s"].items() if v}
    result["end_to_end_docs_per_s"] = round(docs / result["total_s"], 1)
    print(json.dumps({"side": name, **result, **quality, "peak_rss_mb": round(peak / 1024, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/forge_dedup_bench"))
    ap.add_argument("--side", help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = args.work / f"planted_{args.docs}"
    if args.side:
        side(args.side, data, args.work, args.docs)
        return
    if not (data / "truth.json").exists():
        t = time.perf_counter()
        info = write(data, args.docs, seed=0)
        print(f"generated {info['rows']} docs, {info['pairs']} planted pairs in {time.perf_counter() - t:.0f} s")
    results = {}
    for name in ("forge", "datatrove"):
        proc = subprocess.run(
            [sys.executable, __file__, "--docs", str(args.docs), "--work", str(args.work), "--side", name],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(results[name]))
    f, d = results["forge"], results["datatrove"]
    print(f"docs: {args.docs:,}; shingles: word 5-grams; 112 hashes; threshold {THRESHOLD}")
    for step in ("signatures", "buckets", "clusters", "filter"):
        print(f"  {step:<10} forge {f['steps_s'][step]:8.1f} s   datatrove {d['steps_s'][step]:8.1f} s")
    print(f"end to end: forge {f['end_to_end_docs_per_s']:,} docs/s, datatrove {d['end_to_end_docs_per_s']:,} docs/s")
    print(f"forge / datatrove end to end: {d['total_s'] / f['total_s']:.2f}x")
    print(f"peak RSS: forge {f['peak_rss_mb']} MB, datatrove {d['peak_rss_mb']} MB")
    print(
        f"recall (pairs >= {THRESHOLD}): forge {f['recall']}, datatrove {d['recall']}; "
        f"unrelated removed: forge {f['unrelated_removed']}, datatrove {d['unrelated_removed']}"
    )


if __name__ == "__main__":
    main()
