"""Semantic dedup (lexical embedder, CPU) vs forge's MinHash dedup on planted near-paraphrases.

Families of an original and four variants (sentences reordered, 15% of words swapped for
synonyms, the last quarter cut off, and all three) among unrelated documents
(forge/stages/dedup/paraphrases.py). Both methods run through the CLI on the same file; printed:
recall (variants removed as a copy of their own family), false removals (unrelated rows removed,
or a row removed as a copy of another family), rows/s end to end, each step's seconds.

    python benchmarks/semantic_dedup.py [--families 2000] [--unrelated 20000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from forge.stages.curate.rows import content_id
from forge.stages.dedup.paraphrases import plant_paraphrases


def removed(out: Path, by_content: dict[str, str]) -> dict[str, str]:
    import pyarrow.parquet as pq

    rows = [r for f in sorted((out / "rejected").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    return {by_content[r["id"]]: by_content.get(r["duplicate_of"], "?") for r in rows}


def score(gone: dict[str, str], truth: list[list[str]]) -> dict[str, float]:
    family = {i: k for k, ids in enumerate(truth) for i in ids}
    planted = sum(len(f) - 1 for f in truth)
    found = sum(1 for i, of in gone.items() if i in family and family.get(of) == family[i])
    false = sum(1 for i, of in gone.items() if i not in family or family.get(of) != family[i])
    by_kind: dict[str, int] = {}
    for i, of in gone.items():
        if i in family and family.get(of) == family[i]:
            kind = i.split("-", 1)[1]
            by_kind[kind] = by_kind.get(kind, 0) + 1
    return {
        "recall": round(found / planted, 4),
        "false_removals": false,
        "found": found,
        "planted": planted,
        "removed_by_variant": by_kind,
    }


def run(method: list[str], data: Path, out: Path) -> float:
    t0 = time.monotonic()
    args = [
        sys.executable,
        "-m",
        "forge.cli",
        "pipeline=dedup",
        f"dataset.name={data}",
        f"output.dir={out}",
        "run.progress=false",
        *method,
    ]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", type=int, default=2000)
    ap.add_argument("--unrelated", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows, truth = plant_paraphrases(args.families, args.unrelated, args.seed)
    work = Path(tempfile.mkdtemp(prefix="semdedup-"))
    data = work / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_content = {content_id(None, r["text"]): r["id"] for r in rows}
    print(f"{len(rows):,} rows: {args.families:,} families of 5 and {args.unrelated:,} unrelated docs ({work})")
    results = {}
    for name, method in [
        ("semantic (lexical)", ["dedup.method=semantic", "dedup.semantic.embedder=lexical"]),
        ("minhash (J >= 0.7)", ["dedup.method=minhash"]),
        ("minhash (J >= 0.5)", ["dedup.method=minhash", "dedup.minhash.threshold=0.5"]),
    ]:
        out = work / name.split()[0] / name.split()[-1].strip("()=> ")
        seconds = run(method, data, out)
        stats = json.loads((out / "stats.json").read_text())["dedup"]
        results[name] = {
            **score(removed(out, by_content), truth),
            "seconds": round(seconds, 1),
            "rows_per_s": round(len(rows) / seconds),
            "step_seconds": stats["step_seconds"],
        }
    print(f"{'method':22} {'recall':>7} {'false':>6} {'rows/s':>8}  removed by variant")
    for name, r in results.items():
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["removed_by_variant"].items()))
        print(f"{name:22} {r['recall']:7.4f} {r['false_removals']:6d} {r['rows_per_s']:8,}  {kinds}")
    for name, r in results.items():
        print(f"{name}: step seconds {r['step_seconds']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
