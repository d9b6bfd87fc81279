"""forge's `decontaminate` curate filter vs datatrove 0.10.1's NGramsDecontFilter, side by side in one run.

Same benchmark, same documents, same n (13), one core each:

- the benchmark: --items synthetic items (a question and an answer of 20-60 words each, word salad from
  a Zipf-weighted word list), written as one jsonl with the columns id/question/answer;
- the documents: --docs texts of 100-400 words from the same word list; ~2% of them carry one
  benchmark question verbatim: as its own paragraph, upper-cased, or spliced inside a sentence
  of a longer text (a third each);
- forge: `build_filters([{name: decontaminate, benchmarks: [file], n: 13}])` (index built in an empty
  $FORGE_CACHE, then loaded from that cache as a second run would), `.check({"text": ...})` per doc;
- datatrove: its index is what NGramsDecontIndexer writes (`<task>.index.hashes`), built here with
  the indexer's own `compute_hashes` recipe (lighteval, where its tasks come from, is not installed):
  datatrove's English word tokenizer, `simplify_text`, `ngrams`, NGramsDecontConfig(n_grams=13,
  find_query_ngrams=True) (query, label and query/label-overlap n-grams); then
  `NGramsDecontFilter(folder).filter(Document)` per doc. datatrove's default hash (HashConfig():
  xxhash) raises "Strings must be encoded before hashing" with xxhash 4.x, so `--dt-hash xxhash`
  (the default) gives both its indexer recipe and its filter `xxh64_intdigest(s.encode())`, what
  xxhash 3.x did with a str (same hash values); `--dt-hash sha1` runs its other built-in hash instead.

Prints per side the index build (and load) time, filter CPU seconds and docs/s on one core, rows
flagged, recall on the planted documents (by way of planting), false flags, where the two sides
disagree, and the ratio forge / datatrove docs per second.

    python benchmarks/decontaminate.py [--docs 15000] [--items 1000] [--seed 0] [--dt-hash xxhash|sha1]
                                       [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from curate import _COMMON  # noqa: E402

N = 13
PLANT_SHARE = 0.02
KINDS = ("paragraph", "upper", "inline")

# --------------------------------------------------------------------------------------------------
# input: word salad, deterministic for a seed
# --------------------------------------------------------------------------------------------------

# common English words (benchmarks/curate.py's list, most frequent first: Zipf weights by rank), then a tail
_EXTRA = "London Google Monday 2019 2024 $20 10% café naïve don't well-known e.g. U.S.".split()
_SYLL = [c + v for c in "b c d f g h k l m n p r s t v w z br ch cl dr fl gr pl pr sh st th tr".split()
         for v in "a e i o u ea io ou ar er or in on en".split()]  # fmt: skip
_TAIL = 30_000


def vocabulary() -> tuple[np.ndarray, np.ndarray]:
    """The words and their probabilities: the common words Zipf-weighted by rank (88%), a fixed tail of
    pseudo-words (12%), so the vocabulary keeps growing as real text does. Independent of the seed."""
    rng = np.random.default_rng(12345)
    syl = np.array(_SYLL, dtype=object)
    picks = rng.integers(0, len(syl), size=(_TAIL * 2, 3))
    sizes = rng.integers(2, 4, size=_TAIL * 2)
    tail = list(dict.fromkeys("".join(syl[picks[i, : sizes[i]]]) for i in range(_TAIL * 2)))[:_TAIL]
    head = list(dict.fromkeys(_COMMON)) + _EXTRA
    hw = 1.0 / (np.arange(len(head)) + 2.7)
    tw = 1.0 / (np.arange(len(tail)) + 10.0)
    p = np.concatenate([hw * 0.88 / hw.sum(), tw * 0.12 / tw.sum()])
    return np.array(head + tail, dtype=object), p / p.sum()


class Words:
    def __init__(self, seed: int) -> None:
        self.words, self.p = vocabulary()
        self.rng = np.random.default_rng(seed)
        self.buf: list[str] = []
        self.pos = 0

    def take(self, n: int) -> list[str]:
        if self.pos + n > len(self.buf):
            idx = self.rng.choice(len(self.words), size=max(1 << 20, n), p=self.p)
            self.buf, self.pos = self.words[idx].tolist(), 0
        self.pos += n
        return self.buf[self.pos - n : self.pos]


def sentences(w: Words, rng: np.random.Generator, n_words: int) -> list[str]:
    out, used = [], 0
    while used < n_words:
        n = min(int(rng.integers(5, 26)), max(n_words - used, 4))
        s = w.take(n)
        s[0] = s[0].capitalize()
        if n > 8 and rng.random() < 0.4:
            s[n // 2] += ","
        out.append(" ".join(s) + (". " if rng.random() < 0.85 else "? "))
        used += n
    return out


def make_benchmark(path: Path, items: int, seed: int) -> list[dict]:
    w, rng = Words(seed * 7919 + 1), np.random.default_rng(seed * 7919 + 2)
    rows = []
    for i in range(items):
        q = w.take(int(rng.integers(20, 61)))
        a = w.take(int(rng.integers(20, 61)))
        q[0], a[0] = q[0].capitalize(), a[0].capitalize()
        rows.append({"id": f"q{i:05d}", "question": " ".join(q) + "?", "answer": " ".join(a) + "."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def make_docs(bench: list[dict], docs: int, seed: int) -> tuple[list[dict], dict[str, tuple[str, str]]]:
    """The documents and the planted ones: {doc id: (item id, how it was planted)}."""
    w, rng = Words(seed), np.random.default_rng(seed + 1)
    planted_at = set(rng.choice(docs, size=max(1, round(docs * PLANT_SHARE)), replace=False).tolist())
    out, truth = [], {}
    for i in range(docs):
        sents = sentences(w, rng, int(rng.integers(100, 401)))
        doc_id = f"d{i:06d}"
        if i in planted_at:
            item = bench[int(rng.integers(len(bench)))]
            kind = KINDS[len(truth) % len(KINDS)]
            at = int(rng.integers(0, len(sents) + 1))
            if kind == "paragraph":
                text = "".join(sents[:at]).strip() + "\n\n" + item["question"] + "\n\n" + "".join(sents[at:]).strip()
            elif kind == "upper":
                text = "".join(sents[:at]) + item["question"].upper() + " " + "".join(sents[at:])
            else:  # inside a sentence, no break around it
                host = sents[min(at, len(sents) - 1)].split(" ")
                cut = int(rng.integers(1, max(2, len(host) - 1)))
                q = item["question"]
                sents[min(at, len(sents) - 1)] = " ".join(host[:cut] + [q[0].lower() + q[1:].rstrip("?")] + host[cut:])
                text = "".join(sents)
            truth[doc_id] = (item["id"], kind)
        else:
            text = "".join(sents)
        out.append({"id": doc_id, "text": text.strip()})
    return out, truth


# --------------------------------------------------------------------------------------------------
# the two sides
# --------------------------------------------------------------------------------------------------


def run_forge(bench_file: Path, docs: list[dict], cache: Path) -> dict:
    os.environ["FORGE_CACHE"] = str(cache)
    import forge.compose  # noqa: F401  (hydra & co: a process's start, 0.25 s, not index building)
    from forge.stages.curate.filters import build_filters

    spec = [{"name": "decontaminate", "benchmarks": [str(bench_file)], "n": N}]
    t = time.perf_counter()
    f = build_filters(spec, None)[0]
    build = time.perf_counter() - t
    t = time.perf_counter()
    f = build_filters(spec, None)[0]  # a second run: the index from $FORGE_CACHE
    load = time.perf_counter() - t
    f.check({"text": docs[0]["text"]})  # warm up
    flagged: dict[str, str] = {}
    t, c = time.perf_counter(), time.process_time()
    for d in docs:
        r = f.check({"text": d["text"]})
        if r is not None:
            flagged[d["id"]] = r.value["item"]
    cpu, wall = time.process_time() - c, time.perf_counter() - t
    return {"index_build_s": build, "index_load_s": load, "index_entries": int(len(f.index.hashes)),
            "filter_cpu_s": cpu, "filter_wall_s": wall, "flagged": flagged}  # fmt: skip


def dt_hash_func(name: str):
    import xxhash
    from datatrove.utils.hashing import HashConfig, create_hash_func

    if name == "sha1":
        return HashConfig(hash_fc="sha1"), create_hash_func(HashConfig(hash_fc="sha1"))
    config = HashConfig()  # xxhash, 64 bits
    func = create_hash_func(config)
    try:
        func("probe")
    except TypeError:  # xxhash 4.x takes bytes only; xxhash 3.x hashed a str's UTF-8
        xxh64 = xxhash.xxh64_intdigest

        def func(s: str) -> int:
            return xxh64(s.encode())

    return config, func


def run_datatrove(bench: list[dict], docs: list[dict], folder: Path, hash_name: str) -> dict:
    from datatrove.data import Document
    from datatrove.pipeline.decont.n_grams import NGramsDecontConfig, NGramsDecontFilter
    from datatrove.utils.text import ngrams, simplify_text
    from datatrove.utils.word_tokenizers import load_word_tokenizer
    from loguru import logger

    logger.remove()
    hash_config, hash_func = dt_hash_func(hash_name)
    cfg = NGramsDecontConfig(n_grams=N, find_query_ngrams=True, hash_config=hash_config)
    tokenizer = load_word_tokenizer("en")
    tokenizer.word_tokenize("warm up")  # spaCy's load is not index building

    def compute_hashes(label: str, query: str | None = None) -> list[int]:  # NGramsDecontIndexer.compute_hashes
        label_tokens = tokenizer.word_tokenize(simplify_text(label, cfg.norm_config))
        grams = list(ngrams(label_tokens, cfg.n_grams))
        if query is not None:
            query_tokens = tokenizer.word_tokenize(simplify_text(query, cfg.norm_config))
            if cfg.find_query_ngrams:
                grams.extend(ngrams(query_tokens, cfg.n_grams))
            if cfg.find_overlap_ngrams:
                grams.extend(
                    query_tokens[-cfg.n_grams + 1 + i :] + label_tokens[: i + 1]
                    for i in range(cfg.n_grams - 1)
                    if len(query_tokens) >= cfg.n_grams - 1 - i and len(label_tokens) >= i + 1
                )
        return list(map(hash_func, map(" ".join, grams)))

    t = time.perf_counter()
    hashes: set[int] = set()
    for item in bench:  # the gold is the label, the question the query (as lighteval's docs give them)
        hashes.update(compute_hashes(item["answer"], item["question"]))
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "synthetic_bench.index.hashes", "wb") as fh:
        np.array(list(hashes), dtype=hash_config.np_descr).tofile(fh)
    build = time.perf_counter() - t

    f = NGramsDecontFilter(str(folder), config=cfg)
    f.hash_func = hash_func
    f.tokenizer.word_tokenize("warm up")
    t = time.perf_counter()
    f.load_index_hashes()
    load = time.perf_counter() - t
    flagged: dict[str, str] = {}
    t, c = time.perf_counter(), time.process_time()
    for d in docs:
        doc = Document(text=d["text"], id=d["id"])
        if f.filter(doc) is not True:
            flagged[d["id"]] = doc.metadata["contaminated_task"]
    cpu, wall = time.process_time() - c, time.perf_counter() - t
    return {"index_build_s": build, "index_load_s": load, "index_entries": len(hashes),
            "filter_cpu_s": cpu, "filter_wall_s": wall, "flagged": flagged}  # fmt: skip


def score(result: dict, truth: dict[str, tuple[str, str]], docs: int, item_ids: bool) -> dict:
    flagged = result.pop("flagged")
    found = [d for d in truth if d in flagged]
    out = {
        "flagged": len(flagged),
        "planted_found": len(found),
        "recall": round(len(found) / len(truth), 4),
        "recall_by_kind": {k: sum(1 for d in found if truth[d][1] == k) for k in KINDS},
        "false_flags": sum(1 for d in flagged if d not in truth),
        "docs_per_s": round(docs / result["filter_cpu_s"], 1),
    }
    if item_ids:  # forge names the item; datatrove only the task
        out["right_item"] = sum(1 for d in found if flagged[d] == truth[d][0])
    return {**{k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}, **out, "_ids": set(flagged)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=15_000)
    ap.add_argument("--items", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dt-hash", choices=("xxhash", "sha1"), default="xxhash")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="forge_decont_bench_") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        bench_file = tmp / "synthetic_bench.jsonl"
        bench = make_benchmark(bench_file, args.items, args.seed)
        docs, truth = make_docs(bench, args.docs, args.seed)
        words = sum(d["text"].count(" ") + 1 for d in docs)
        mb = sum(len(d["text"].encode()) for d in docs) / 1e6
        print(f"generated {args.items:,} items and {args.docs:,} docs ({words:,} words, {mb:.1f} MB, "
              f"{len(truth)} planted) in {time.perf_counter() - t:.1f} s")  # fmt: skip
        f = score(run_forge(bench_file, docs, tmp / "forge_cache"), truth, args.docs, True)
        d = score(run_datatrove(bench, docs, tmp / "dt_index", args.dt_hash), truth, args.docs, False)

    both, f_only, d_only = len(f["_ids"] & d["_ids"]), len(f["_ids"] - d["_ids"]), len(d["_ids"] - f["_ids"])
    f.pop("_ids"), d.pop("_ids")
    ratio = f["docs_per_s"] / d["docs_per_s"]
    print(f"n = {N}; benchmark: {args.items:,} items (question + answer); datatrove hash: {args.dt_hash}")
    print(f"{'':28}{'forge':>14}{'datatrove':>14}")
    rows = [
        ("index build (s)", "index_build_s", "{:.3f}"),
        ("index load (s)", "index_load_s", "{:.3f}"),
        ("index entries (n-grams)", "index_entries", "{:,}"),
        ("filter CPU (s)", "filter_cpu_s", "{:.2f}"),
        ("docs/s (one core)", "docs_per_s", "{:,.0f}"),
        ("rows flagged", "flagged", "{:,}"),
        (f"planted found (of {len(truth)})", "planted_found", "{:,}"),
        ("recall", "recall", "{:.4f}"),
        ("false flags", "false_flags", "{:,}"),
    ]
    for label, key, fmt in rows:
        print(f"  {label:<26}{fmt.format(f[key]):>14}{fmt.format(d[key]):>14}")
    per_kind = " ".join(f"{k} {f['recall_by_kind'][k]}/{d['recall_by_kind'][k]}" for k in KINDS)
    print(f"  planted found by kind (forge/datatrove): {per_kind}")
    print(f"  forge named the planted item: {f['right_item']}/{f['planted_found']}")
    print(f"  agreement: flagged by both {both}, forge only {f_only}, datatrove only {d_only}")
    print(f"forge / datatrove docs per second: {ratio:.2f}x")
    if args.json:
        summary = {"docs": args.docs, "items": args.items, "seed": args.seed, "n": N, "planted": len(truth),
                   "dt_hash": args.dt_hash, "forge": f, "datatrove": d, "ratio_docs_per_s": round(ratio, 2),
                   "agreement": {"both": both, "forge_only": f_only, "datatrove_only": d_only}}  # fmt: skip
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
