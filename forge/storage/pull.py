"""`forge-pull URL DIR`: bring a remote run dir down to local disk (data/, tokens/, everything it
holds), e.g. so forge.data memory-maps its shards. A second call downloads only what changed."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from forge.storage.config import StorageConfig
from forge.storage.fs import StorageError, configure, is_remote
from forge.storage.lease import live_holders
from forge.storage.mirror import MARKER, Mirror


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="forge-pull", description=__doc__.splitlines()[0])
    ap.add_argument("url", help="the remote run dir (s3://..., gs://..., hf://...)")
    ap.add_argument("dest", type=Path, help="the local directory to fill")
    ap.add_argument("--endpoint-url", default=None, help="an S3-compatible server (else AWS_ENDPOINT_URL)")
    args = ap.parse_args(argv)
    if not is_remote(args.url):
        print(f"forge-pull: {args.url} is not a remote URL (s3://, gs://, hf://, https://...)", file=sys.stderr)
        return 2
    if args.dest.is_dir() and any(args.dest.iterdir()) and not (args.dest / MARKER).exists():
        print(f"forge-pull: {args.dest} holds other files; pick an empty or new directory", file=sys.stderr)
        return 2
    configure(StorageConfig(endpoint_url=args.endpoint_url))
    t0 = time.monotonic()
    try:
        holders = live_holders(args.url)
    except StorageError as exc:
        print(f"forge-pull: error: {exc}", file=sys.stderr)
        return 1
    if holders:
        print(
            f"forge-pull: {args.url} is being written right now by {holders[0]}: the copy is what the store holds "
            "now (whole chunks, maybe not the last ones); pull again once it is finished",
            file=sys.stderr,
        )
    mirror = Mirror(args.url, args.dest)
    try:
        fetched = mirror.pull()
    except StorageError as exc:
        print(f"forge-pull: error: {exc}", file=sys.stderr)
        return 1
    took = time.monotonic() - t0
    size = mirror.bytes_down / 1e6
    print(f"forge-pull: {fetched} file(s), {size:.1f} MB, from {args.url} into {args.dest} in {took:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
