"""Helpers of the object-store tests: put inputs on the test store, read a remote run dir back,
grep the whole bucket for secrets."""

from __future__ import annotations

import io
import json
import random
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
from object_store import KEY_ID, SECRET


def chats(n: int, seed: int = 0, prefix: str = "c") -> list[dict]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    out = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(10))
        out.append(
            {
                "id": f"{prefix}{i}",
                "messages": [
                    {"role": "user", "content": f"{q} number {i}?"},
                    {"role": "assistant", "content": f"answer {i}: {q} {rng.random():.6f}"},
                ],
            }
        )
    return out


def put_parquet(fs, path: str, rows: list[dict], row_group_size: int = 64) -> None:  # noqa: ANN001
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=row_group_size)
    fs.pipe(path, buf.getvalue())


def put_jsonl(fs, path: str, rows: list[dict]) -> None:  # noqa: ANN001
    fs.pipe(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def remote_rows(fs, run: str, sub: str = "data") -> list[dict]:  # noqa: ANN001
    rows: list[dict] = []
    for path in sorted(fs.glob(f"{run}/{sub}/*.parquet")):
        rows += pq.read_table(io.BytesIO(fs.cat_file(path))).to_pylist()
    return rows


def remote_files(fs, run: str) -> list[str]:  # noqa: ANN001
    fs.invalidate_cache()
    return sorted(p[len(run) + 1 :] for p in fs.find(run))


def assert_no_secret_in_bucket(fs, bucket: str, *streams: str) -> None:  # noqa: ANN001
    """Neither credential in any object of the bucket nor in the given streams."""
    fs.invalidate_cache()
    for path in fs.find(bucket):
        blob = fs.cat_file(path)
        for secret in (SECRET, KEY_ID):
            assert secret.encode() not in blob, f"a credential was written to s3://{path}"
    for text in streams:
        for secret in (SECRET, KEY_ID):
            assert secret not in (text or ""), "a credential was printed"


def once(ids: list[str]) -> None:
    dup = [k for k, n in Counter(ids).items() if n > 1]
    assert not dup, f"duplicated: {dup[:5]}"
