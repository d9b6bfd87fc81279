"""Documents with near-duplicates planted at known Jaccard similarities, for dedup's tests, its
benchmark and the README's offline example:

    python -m forge.stages.dedup.planted out/planted --docs 2000

writes `a.jsonl` and `b.jsonl` (two sources; copies are planted within and across them) and
`truth.json` (every planted pair with its exact Jaccard similarity on word 5-gram shingles of the
normalized text, the measure dedup.minhash.threshold is compared with). Words are random
syllable strings, so unrelated documents share no 5-gram. Variants: an interior span of words
replaced (near copies at a chosen Jaccard), and the same text with other case, spacing and
full-width letters (exact copies once normalized).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from forge.stages.dedup.minhash import WORD, normalize

SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = WORD.findall(normalize(text))
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str, n: int = 5) -> float:
    x, y = shingles(a, n), shingles(b, n)
    return len(x & y) / len(x | y) if x | y else 1.0


class Planter:
    def __init__(self, seed: int = 0, vocab: int = 30_000) -> None:
        self.rng = random.Random(seed)
        words = set()
        while len(words) < vocab:
            words.add("".join(self.rng.choice(SYLLABLES) for _ in range(self.rng.randint(2, 4))))
        self.vocab = sorted(words)

    def words(self, n: int) -> list[str]:
        return [self.rng.choice(self.vocab) for _ in range(n)]

    def document(self, low: int = 80, high: int = 300) -> str:
        return " ".join(self.words(self.rng.randint(low, high)))

    def near_copy(self, text: str, target: float, n: int = 5) -> str:
        """The text with one interior span of words replaced so that the shingle Jaccard is as
        close to `target` as a whole number of words allows."""
        words = text.split()
        shingled = len(words) - n + 1
        # replacing r interior words changes r + n - 1 shingles on each side
        best = None
        for r in range(1, len(words) - 2):
            changed = r + n - 1
            j = (shingled - changed) / (shingled + changed)
            if best is None or abs(j - target) < abs(best[1] - target):
                best = (r, j)
        r = best[0]
        start = self.rng.randint(1, len(words) - r - 1)
        return " ".join(words[:start] + self.words(r) + words[start + r :])

    def variant(self, text: str) -> str:
        """The same text once normalized: other case, runs of spaces and newlines, full-width letters."""
        out = []
        for w in text.split():
            if self.rng.random() < 0.2:
                w = w.upper()
            if self.rng.random() < 0.1:
                w = "".join(chr(ord(c) - 0x61 + 0xFF41) if "a" <= c <= "z" else c for c in w)  # ａ..ｚ
            out.append(w)
        return "".join(w + self.rng.choice([" ", "  ", "\n", " \t "]) for w in out).strip()


def plant(
    docs: int, seed: int = 0, targets: tuple[float, ...] = (0.9, 0.8, 0.6), share: float = 0.1, chats: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows of source a, rows of source b, planted pairs). `share` of the docs are originals of a
    planted copy: for each, one near copy per target and one exact variant; copies land in either
    source. With chats=True rows are conversations: the document is the user turn and each row
    has its own random answer (a copy of a prompt, not of a conversation)."""
    p = Planter(seed)
    a: list[dict[str, Any]] = []
    b: list[dict[str, Any]] = []
    truth: list[dict[str, Any]] = []
    originals = max(1, int(docs * share / (len(targets) + 2)))
    counter = 0

    def add(text: str, where: list | None = None) -> str:
        nonlocal counter
        counter += 1
        rid = f"d{counter:07d}"
        row: dict[str, Any] = {"id": rid}
        if chats:
            answer = p.document(20, 60)
            row["messages"] = [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        else:
            row["text"] = text
        (where if where is not None else (a if p.rng.random() < 0.5 else b)).append(row)
        return rid

    planted: list[tuple[str, str]] = []
    for _ in range(originals):
        original = p.document()
        oid = add(original, a)
        for t in targets:
            copy = p.near_copy(original, t)
            planted.append((oid, original, add(copy), copy, "near"))
        variant = p.variant(original)
        planted.append((oid, original, add(variant), variant, "exact"))
    while counter < docs:
        add(p.document())
    for oid, original, cid, copy, kind in planted:
        truth.append({"a": oid, "b": cid, "kind": kind, "jaccard": round(jaccard(original, copy), 4)})
    # interleave, so copies are not next to their originals in the stream
    p.rng.shuffle(a)
    p.rng.shuffle(b)
    return a, b, truth


def write(out: Path, docs: int, seed: int = 0, chats: bool = False) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    a, b, truth = plant(docs, seed, chats=chats)
    for name, rows in (("a", a), ("b", b)):
        with open(out / f"{name}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (out / "truth.json").write_text(json.dumps(truth))
    return {"rows": len(a) + len(b), "pairs": len(truth)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chats", action="store_true", help="conversations: the document is the user turn")
    args = ap.parse_args()
    info = write(args.out, args.docs, args.seed, args.chats)
    print(f"{info['rows']} rows, {info['pairs']} planted pairs in {args.out} (a.jsonl, b.jsonl, truth.json)")


if __name__ == "__main__":
    main()


def evaluate(removed: dict[str, str | None], truth: list[dict[str, Any]], rows: int, threshold: float) -> dict:
    """Recall and false removals of a dedup result. `removed`: input id -> the input id it was
    removed as a copy of (None when unknown). A planted pair is found when one of its two rows
    was removed; recall counts the pairs at or above the threshold."""
    planted_ids = {x["a"] for x in truth} | {x["b"] for x in truth}
    above = [x for x in truth if x["jaccard"] >= threshold]
    below = [x for x in truth if x["jaccard"] < threshold]
    found = sum(1 for x in above if x["a"] in removed or x["b"] in removed)
    below_found = sum(1 for x in below if x["b"] in removed)
    unrelated = rows - len(planted_ids)
    false = sum(1 for rid in removed if rid not in planted_ids)
    return {
        "pairs_above_threshold": len(above),
        "recall": round(found / len(above), 4) if above else 1.0,
        "pairs_below_threshold": len(below),
        "below_threshold_removed": round(below_found / len(below), 4) if below else 0.0,
        "unrelated_rows": unrelated,
        "unrelated_removed": round(false / unrelated, 6) if unrelated else 0.0,
    }


def removed_in_run(out_dir: Path) -> dict[str, str | None]:
    """input id -> input id it duplicates, from a forge dedup run dir (rejected/ and data/)."""
    import pyarrow.parquet as pq

    def rows(sub: str) -> list[dict[str, Any]]:
        files = sorted((out_dir / sub).glob("*.parquet"))
        return [r for f in files for r in pq.read_table(f).to_pylist()]

    by_content = {r["id"]: r["source"]["id"] for r in rows("data")}
    removed: dict[str, str | None] = {}
    for r in rows("rejected"):
        if r.get("duplicate_of"):
            removed[json.loads(r["row"])["id"]] = by_content.get(r["duplicate_of"])
    return removed
