"""Families of planted near-paraphrases among unrelated documents, for semantic dedup's tests,
benchmark and the README's offline example:

    python -m forge.stages.dedup.paraphrases out/para --families 200 --unrelated 2000

writes `docs.jsonl` (rows with `id` and `text`, shuffled) and `truth.json` (each family's ids,
the original first). A family is an original and its variants: sentences reordered, words
swapped for synonyms, the ending cut off, and the three combined. Words follow a Zipf law over a
vocabulary of syllable strings, so unrelated documents share the common words (as real text
does) and little else.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from forge.stages.dedup.planted import Planter


class Paraphraser:
    def __init__(self, seed: int = 0, vocab: int = 20_000) -> None:
        planter = Planter(seed, vocab)
        self.rng = planter.rng
        self.vocab = planter.vocab
        self.weights = [1 / (rank + 10) for rank in range(len(self.vocab))]
        shuffled = self.vocab[:]
        self.rng.shuffle(shuffled)
        self.synonym = dict(zip(self.vocab, shuffled, strict=True))  # each word has one "synonym"

    def sentence(self) -> list[str]:
        return self.rng.choices(self.vocab, self.weights, k=self.rng.randint(8, 16))

    def document(self) -> list[list[str]]:
        return [self.sentence() for _ in range(self.rng.randint(6, 14))]

    def reordered(self, doc: list[list[str]]) -> list[list[str]]:
        out = [s[:] for s in doc]
        while out == doc:
            self.rng.shuffle(out)
        return out

    def synonyms(self, doc: list[list[str]], share: float = 0.15) -> list[list[str]]:
        return [[self.synonym[w] if self.rng.random() < share else w for w in s] for s in doc]

    def truncated(self, doc: list[list[str]], keep: float = 0.75) -> list[list[str]]:
        return doc[: max(1, round(len(doc) * keep))]

    def variants(self, doc: list[list[str]]) -> dict[str, list[list[str]]]:
        return {
            "reordered": self.reordered(doc),
            "synonyms": self.synonyms(doc),
            "truncated": self.truncated(doc),
            "combined": self.truncated(self.synonyms(self.reordered(doc), 0.1), 0.85),
        }


def text(doc: list[list[str]]) -> str:
    return " ".join(" ".join(s).capitalize() + "." for s in doc)


def plant_paraphrases(families: int, unrelated: int, seed: int = 0) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """(rows in a shuffled order, families as id lists with the original first)."""
    p = Paraphraser(seed)
    rows: list[dict[str, Any]] = []
    truth: list[list[str]] = []
    for f in range(families):
        doc = p.document()
        ids = [f"fam{f}-original"]
        rows.append({"id": ids[0], "text": text(doc)})
        for kind, variant in p.variants(doc).items():
            ids.append(f"fam{f}-{kind}")
            rows.append({"id": ids[-1], "text": text(variant)})
        truth.append(ids)
    rows += [{"id": f"other{i}", "text": text(p.document())} for i in range(unrelated)]
    p.rng.shuffle(rows)
    return rows, truth


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--families", type=int, default=200)
    ap.add_argument("--unrelated", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows, truth = plant_paraphrases(args.families, args.unrelated, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "docs.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    (args.out / "truth.json").write_text(json.dumps(truth))
    print(f"{len(rows)} rows ({args.families} families of 5, {args.unrelated} unrelated) in {args.out}")


if __name__ == "__main__":
    main()
