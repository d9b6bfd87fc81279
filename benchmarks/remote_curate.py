"""forge's curate stage with its input and run dir on an object store vs on local disk, same data.

The store is a real S3-compatible server (moto_server, started here on 127.0.0.1); the input is
the synthetic web-like English of benchmarks/curate.py, as Parquet files. Both sides run the same
command (Gopher quality + repetition, FineWeb quality) in their own subprocess, alternately,
`--repeat` times each; wall time, CPU seconds and the peak RSS come from outside (os.wait4). The
headline is remote throughput / local throughput (input MB/s), the issue's target being >= 0.8.

    python benchmarks/remote_curate.py [--docs 15000] [--files 8] [--repeat 2] [--filters datatrove|none]
                                       [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from curate import forge_cmd, make_docs, measure  # noqa: E402  (benchmarks/curate.py)

KEY_ID, SECRET = "BENCHKEYID00000000001", "benchSecretKey000000000000000000000001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_store(log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(log, "wb"),  # noqa: SIM115 (closed with the process)
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto_server did not start")


def to_parquet(jsonl: Path, out: Path, files: int) -> int:
    """Split the jsonl into `files` Parquet files (zstd, as corpora on stores are); their bytes."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    table = pj.read_json(jsonl)
    out.mkdir(parents=True, exist_ok=True)
    step = -(-table.num_rows // files)
    for i in range(files):
        pq.write_table(table.slice(i * step, step), out / f"part-{i:05d}.parquet", compression="zstd")
    return sum(p.stat().st_size for p in out.glob("*.parquet"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=15_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--filters",
        choices=["datatrove", "none"],
        default="datatrove",
        help="datatrove: Gopher + FineWeb filters (CPU-bound); none: normalize only (I/O shows)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="forge-remote-bench-"))
    store, endpoint = start_store(work / "moto.log")
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID=KEY_ID,
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        FORGE_SCRATCH=str(work / "scratch"),
    )
    try:
        import s3fs

        make_docs(work / "docs.jsonl", args.docs, args.seed)
        in_bytes = to_parquet(work / "docs.jsonl", work / "in", args.files)
        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        fs.put(str(work / "in") + "/", "bench/in/", recursive=True)
        print(f"input: {args.docs} docs, {args.files} Parquet files, {in_bytes / 1e6:.1f} MB; store: moto_server")
        extra = ["curate.filters=[]"] if args.filters == "none" else []
        sides = {
            "local": lambda i: forge_cmd(work / "in", work / f"local-{i}", *extra),
            "remote": lambda i: forge_cmd("s3://bench/in/", f"s3://bench/runs/r{i}", *extra),
        }
        results: dict[str, list[dict]] = {name: [] for name in sides}
        for i in range(args.repeat):
            for name, cmd in sides.items():
                shutil.rmtree(work / "scratch", ignore_errors=True)  # a fresh machine each time
                r = measure(cmd(i), work / f"{name}-{i}.log")
                if r["rc"] != 0:
                    raise SystemExit(f"{name} failed:\n{(work / f'{name}-{i}.log').read_text()[-3000:]}")
                results[name].append(r)
                line = f"{r['wall_s']:.2f} s wall, {r['cpu_s']:.1f} CPU s, {r['max_rss_mb']:.0f} MB RSS"
                print(f"  {name:<13} run {i}: {line}")
        kept_local = len(list((work / "local-0" / "data").glob("*.parquet")))
        kept_remote = len(fs.glob("bench/runs/r0/data/*.parquet"))
        summary = {}
        for name, runs in results.items():
            wall = statistics.median(r["wall_s"] for r in runs)
            summary[name] = {
                "wall_s": round(wall, 3),
                "docs_per_s": round(args.docs / wall, 1),
                "input_mb_per_s": round(in_bytes / 1e6 / wall, 2),
                "peak_rss_mb": round(max(r["max_rss_mb"] for r in runs), 1),
                "cpu_s": round(statistics.median(r["cpu_s"] for r in runs), 2),
            }
        ratio = summary["local"]["wall_s"] / summary["remote"]["wall_s"]
        print(f"\n{'side':<8}{'wall s':>9}{'docs/s':>10}{'input MB/s':>12}{'peak RSS MB':>13}{'CPU s':>8}")
        for name, s in summary.items():
            print(
                f"{name:<8}{s['wall_s']:>9.2f}{s['docs_per_s']:>10.0f}{s['input_mb_per_s']:>12.2f}"
                f"{s['peak_rss_mb']:>13.0f}{s['cpu_s']:>8.1f}"
            )
        print(f"\nremote / local throughput: {ratio:.2f}x (target >= 0.8), filters: {args.filters}")
        print(f"chunks kept: {kept_local} local, {kept_remote} remote")
        if args.json:
            args.json.write_text(
                json.dumps({"docs": args.docs, "input_mb": in_bytes / 1e6, "sides": summary, "ratio": ratio}, indent=2)
            )
    finally:
        store.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
