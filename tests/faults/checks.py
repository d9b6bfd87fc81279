"""Assertions every fault test makes: the contract in README's "What forge promises"."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq


def rows_of(out_dir: Path, sub: str = "data") -> list[dict]:
    rows: list[dict] = []
    for f in sorted((out_dir / sub).glob("*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


def assert_exactly_once(out_dir: Path, ids: list[str], rollouts: int = 1, rejected_ok: bool = True) -> None:
    """Every expected (id, rollout) is in data/ exactly once, or (rejected_ok) in rejected/, never both;
    no row is in data/ twice and no id outside `ids` appears in data/."""
    data = Counter((r["id"], r["rollout"]) for r in rows_of(out_dir))
    dup = [k for k, n in data.items() if n > 1]
    assert not dup, f"duplicated rows: {dup[:5]}"
    extra = {k for k in data if k[0] not in set(ids)}
    assert not extra, f"rows for ids that are not in the input: {sorted(extra)[:5]}"
    rejected = rows_of(out_dir, "rejected")
    rej = {(r["id"], r["rollout"]) for r in rejected} | {
        (r["id"], ri) for r in rejected if r["rollout"] < 0 for ri in range(rollouts)
    }
    missing = [
        (i, r) for i in ids for r in range(rollouts) if (i, r) not in data and not (rejected_ok and (i, r) in rej)
    ]
    assert not missing, f"rows lost: {missing[:5]} ({len(missing)} of {len(ids) * rollouts})"
    both = [k for k in data if k in rej]
    assert not both, f"rows both written and rejected: {both[:5]}"


def assert_no_secret(out_dir: Path, secrets: list[str], *streams: str) -> None:
    """No secret in any file under out_dir (binary files included) nor in the given output streams."""
    for path in out_dir.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            for s in secrets:
                assert s.encode() not in blob, f"secret {s[:4]}... written to {path}"
    for text in streams:
        for s in secrets:
            assert s not in (text or ""), "secret printed to the terminal"


def error_line(stderr: str) -> str:
    """The one `forge: error:` line (config errors too); no traceback anywhere."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("forge: error:")]
    assert len(lines) == 1, f"expected one error line, got {lines!r}\n{stderr[-3000:]}"
    return lines[0]
