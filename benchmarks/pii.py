"""forge's `pii` curate filter vs datatrove 0.10.1's PIIFormatter, side by side in one run.

Same texts, one core each:

- planted: forge/stages/curate/planted_pii.py's `planted_texts(--texts, --seed)`: short texts with
  0-3 planted values of six types (email, phone, ip, credit_card, iban, secret) among decoys that only
  look like PII (dates, versions, order numbers, Luhn-failing cards, ISBNs, commit hashes);
- clean: --clean web-like documents of 100-400 words with no PII (benchmarks/decontaminate.py's
  word salad: sentences, commas, numbers, `$20`, `10%`, `e.g.`, `U.S.`): the common case.

Speed: forge's filter as a run builds it (`build_filters([{name: pii}])`, action redact, every type),
`.check({"text": ...})` per text; datatrove's `PIIFormatter().format(text)` (emails and public IPv4).
texts/s and MB/s (UTF-8) on CPU seconds.

Quality, per type: forge as tests/stages/curate/test_pii.py measures it: `PiiFinder().spans(text)`,
a find is right when its exact text and type are a planted value's; datatrove: a planted value is
found when it no longer appears in the formatted text, and every other change (a word diff of the
original and the formatted text, outside the planted values) is a false removal, typed by the
replacement put in (an address with `@`: email, else ip). datatrove covers email and IPv4 only, so
its recall on the other types is what it takes by accident (0 when nothing). Also counted: what
each side finds or changes in the clean documents (all of it false).

    python benchmarks/pii.py [--texts 10000] [--clean 2000] [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from decontaminate import Words, sentences  # noqa: E402

from forge.stages.curate.pii import TYPES, PiiFinder  # noqa: E402
from forge.stages.curate.planted_pii import planted_texts  # noqa: E402


def clean_docs(n: int, seed: int) -> list[str]:
    w, rng = Words(seed + 101), np.random.default_rng(seed + 102)
    out = []
    for _ in range(n):
        sents = sentences(w, rng, int(rng.integers(100, 401)))
        cut = int(rng.integers(1, len(sents) + 1))
        out.append(("".join(sents[:cut]).strip() + "\n\n" + "".join(sents[cut:])).strip())
    return out


def timed(func, texts: list[str]) -> dict:
    func(texts[0])  # warm up (phonenumbers' metadata, regex compiles)
    t = time.process_time()
    for text in texts:
        func(text)
    cpu = time.process_time() - t
    mb = sum(len(text.encode()) for text in texts) / 1e6
    return {"cpu_s": round(cpu, 3), "texts_per_s": round(len(texts) / cpu, 1), "mb_per_s": round(mb / cpu, 3)}


def per_type(tp: Counter, fn: Counter, fp: Counter) -> dict:
    out = {}
    for t in (*TYPES, "all"):
        a, b, c = (sum(x.values()) for x in (tp, fn, fp)) if t == "all" else (tp[t], fn[t], fp[t])
        out[t] = {"planted": a + b, "found": a, "false": c, "recall": round(a / (a + b), 4) if a + b else None,
                  "precision": round(a / (a + c), 4) if a + c else None}  # fmt: skip
    return out


def examples(tp: Counter, fn: Counter, fp: Counter, misses: Counter, falses: Counter) -> dict:
    return {
        "types": per_type(tp, fn, fp),
        "missed_examples": [f"{t}: {v}" for (t, v), _ in misses.most_common(8)],
        "false_examples": [f"{t}: {v}" for (t, v), _ in falses.most_common(8)],
    }


def forge_quality(planted: list[tuple[str, dict]]) -> dict:
    finder = PiiFinder()
    tp, fn, fp = Counter(), Counter(), Counter()
    misses, falses = Counter(), Counter()
    for text, values in planted:
        found = Counter((text[a:b], t) for a, b, t in finder.spans(text))
        want = Counter((v, t) for t, vs in values.items() for v in vs)
        for (_, t), k in (found & want).items():
            tp[t] += k
        for (v, t), k in (want - found).items():
            fn[t] += k
            misses[(t, v)] += k
        for (v, t), k in (found - want).items():
            fp[t] += k
            falses[(t, v)] += k
    return examples(tp, fn, fp, misses, falses)


WORD = re.compile(r"\S+")


def changed_regions(original: str, formatted: str) -> list[tuple[int, int, str]]:
    """(start, end) in the original and the text put in, of each word run the formatter changed."""
    a = [(m.start(), m.end(), m.group()) for m in WORD.finditer(original)]
    b = [m.group() for m in WORD.finditer(formatted)]
    sm = difflib.SequenceMatcher(None, [w for _, _, w in a], b, autojunk=False)
    out = []
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            continue
        start = a[i1][0] if i1 < len(a) else len(original)
        end = a[i2 - 1][1] if i2 > i1 else start
        out.append((start, end, " ".join(b[j1:j2])))
    return out


def datatrove_quality(fmt, planted: list[tuple[str, dict]]) -> dict:
    tp, fn, fp, ip_missed = Counter(), Counter(), Counter(), Counter()
    misses, falses = Counter(), Counter()
    for text, values in planted:
        out = fmt.format(text)
        where = []
        for t, vs in values.items():
            for v in vs:
                if v in out:
                    fn[t] += 1
                    misses[(t, v)] += 1
                    if t == "ip":
                        ip_missed["IPv6" if ":" in v else "IPv4 not global"] += 1
                else:
                    tp[t] += 1
                at = text.find(v)
                while at != -1:
                    where.append((at, at + len(v)))
                    at = text.find(v, at + 1)
        if out == text:
            continue
        for start, end, put in changed_regions(text, out):
            if any(start < b and a < end for a, b in where):
                continue  # the change is (around) a planted value
            t = "email" if "@" in put else "ip"
            fp[t] += 1
            falses[(t, text[start:end])] += 1
    return {**examples(tp, fn, fp, misses, falses), "ip_missed": dict(ip_missed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=10_000, help="planted texts")
    ap.add_argument("--clean", type=int, default=2_000, help="clean documents (100-400 words, no PII)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    from datatrove.pipeline.formatters.pii import PIIFormatter

    from forge.stages.curate.filters import build_filters

    t = time.perf_counter()
    planted = planted_texts(args.texts, args.seed)
    clean = clean_docs(args.clean, args.seed)
    texts = [text for text, _ in planted]
    n_values = sum(len(vs) for _, v in planted for vs in v.values())
    mb_p, mb_c = (sum(len(x.encode()) for x in xs) / 1e6 for xs in (texts, clean))
    print(f"generated {len(texts):,} planted texts ({mb_p:.1f} MB, {n_values:,} values) and {len(clean):,} clean docs "
          f"({mb_c:.1f} MB) in {time.perf_counter() - t:.1f} s")  # fmt: skip

    forge_filter = build_filters([{"name": "pii"}], None)[0]
    dt = PIIFormatter()

    def forge_check(text: str) -> None:
        forge_filter.check({"text": text})

    speed = {
        name: {"forge": timed(forge_check, xs), "datatrove": timed(dt.format, xs)}
        for name, xs in (("planted", texts), ("clean", clean))
    }
    quality = {"forge": forge_quality(planted), "datatrove": datatrove_quality(dt, planted)}
    finder = PiiFinder()
    clean_false = {
        "forge": Counter(f"{t}: {s[a:b]}" for s in clean for a, b, t in finder.spans(s)),
        "datatrove": Counter(f"{put}" for s in clean if (o := dt.format(s)) != s for *_, put in changed_regions(s, o)),
    }

    print(f"{'speed, one core':<28}{'forge':>24}{'datatrove':>24}{'MB/s ratio':>12}")
    for name, n in (("planted", len(texts)), ("clean", len(clean))):
        f, d = speed[name]["forge"], speed[name]["datatrove"]
        label, ratio = f"{name} ({n:,} texts)", f["mb_per_s"] / d["mb_per_s"]
        print(f"  {label:<26}{f['texts_per_s']:>9,.0f} t/s {f['mb_per_s']:>6.2f} MB/s"
              f"{d['texts_per_s']:>9,.0f} t/s {d['mb_per_s']:>6.2f} MB/s{ratio:>11.2f}x")  # fmt: skip
    print("quality on the planted texts (found / planted, recall, false finds, precision)")
    print(f"  {'type':<12}{'forge':>36}{'datatrove':>36}")

    def cell(q: dict) -> str:
        r = "-" if q["recall"] is None else f"{q['recall']:.3f}"
        p = "-" if q["precision"] is None else f"{q['precision']:.3f}"
        return f"{q['found']:>6}/{q['planted']:<6} R {r:>5}  F {q['false']:>3}  P {p:>5}"

    for t in (*TYPES, "all"):
        print(f"  {t:<12}{cell(quality['forge']['types'][t]):>36}{cell(quality['datatrove']['types'][t]):>36}")
    for side in ("forge", "datatrove"):
        q = quality[side]
        if q["missed_examples"]:
            print(f"  {side} missed, e.g.: {'; '.join(q['missed_examples'][:5])}")
        if q["false_examples"]:
            print(f"  {side} false, e.g.: {'; '.join(q['false_examples'][:5])}")
    if quality["datatrove"]["ip_missed"]:
        print(f"  datatrove ip misses: {quality['datatrove']['ip_missed']} (it takes public IPv4 only)")
    for side in ("forge", "datatrove"):
        c = clean_false[side]
        top = "; ".join(f"{k} x{v}" for k, v in c.most_common(5))
        print(f"  clean docs: {side} finds/changes {sum(c.values())}" + (f" (e.g. {top})" if c else ""))
    ratios = {k: round(v["forge"]["mb_per_s"] / v["datatrove"]["mb_per_s"], 3) for k, v in speed.items()}
    print(f"forge / datatrove MB per second: planted {ratios['planted']:.2f}x, clean {ratios['clean']:.2f}x")
    if args.json:
        summary = {"texts": args.texts, "clean": args.clean, "seed": args.seed, "speed": speed, "ratios": ratios,
                   "quality": quality, "clean_false": {k: dict(v) for k, v in clean_false.items()}}  # fmt: skip
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
