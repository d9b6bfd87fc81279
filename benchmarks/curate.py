"""forge's curate stage vs datatrove 0.10.1's LocalPipelineExecutor, same input, same filters.

Both sides read ONE jsonl file of synthetic web-like English documents, run the Gopher
quality, Gopher repetition and FineWeb quality filters with their default settings, and
write the kept documents as Parquet. Each side runs in its own subprocess; wall time and
CPU seconds (user + sys, that process and the children it waited for, via os.wait4) are
taken from outside, so the headline figure is docs per CPU-second ("docs/s per core").
Also measured in the same run: a plain Python floor loop (orjson -> datatrove's own
``.filter(Document)`` x3 -> pyarrow) and the same loop with spaCy's tokenizer called
directly (no sentencizer pipe, no memory_zone): the best ratios on offer without changing
what the filters decide.

    python benchmarks/curate.py [--docs 50000] [--seed 0] [--sides datatrove,floor,floor_fasttok,forge]
                                [--json out.json] [--keep DIR]
    python benchmarks/curate.py --profile 5000     # where datatrove's time goes (cProfile + ablation)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# --------------------------------------------------------------------------------------
# input: synthetic web-like English, deterministic for a seed
# --------------------------------------------------------------------------------------

# ~common English words, most frequent first (Zipf weights are assigned by rank)
_COMMON = """
the of and to a in is it you that he was for on are with as I his they be at one have this from or had by
not but what some we can out other were all there when up use your how said an each she which do their time
if will way about many then them write would like so these her long make thing see him two has look more day
could go come did number sound no most people my over know water than call first who may down side been now
find any new work part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line differ turn cause
much mean before move right boy old too same tell does set three want air well also play small end put home
read hand port large spell add even land here must big high such follow act why ask men change went light kind
off need house picture try us again animal point mother world near build self earth father head stand own page
should country found answer school grow study still learn plant cover food sun four between state keep eye never
last let thought city tree cross farm hard start might story saw far sea draw left late run while press close
night real life few north open seem together next white children begin got walk example ease paper group always
music those both mark often letter until mile river car feet care second book carry took science eat room friend
began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl usual
young ready above ever red list though feel talk bird soon body dog family direct pose leave song measure door
product black short numeral class wind question happen complete ship area half rock order fire south problem piece
told knew pass since top whole king space heard best hour better true during hundred five remember step early hold
west ground interest reach fast verb sing listen six table travel less morning ten simple several vowel toward war
lay against pattern slow center love person money serve appear road map rain rule govern pull cold notice voice unit
power town fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest correct able
pound done beauty drive stood contain front teach week final gave green quick develop ocean warm free minute strong
special mind behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object
decide surface deep moon island foot system busy test record boat common gold possible plane stead dry wonder laugh
thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant fill east paint language
among website online service customer price product company business market data report support quality available
information team project design software free shipping order account email review research health local county
""".split()
_NAMES = "London Google Monday January America Europe John Mary Texas Amazon Microsoft Paris".split()
_NUMBERS = "1 2 3 5 10 12 15 20 24 30 50 100 2019 2020 2021 2023 2024 $20 $99 10%".split()
_STOP = {"the", "be", "to", "of", "and", "that", "have", "with"}  # datatrove's gopher STOP_WORDS
_FILLERS = ["however", "in fact", "for example", "of course", "in general", "as a result"]


_SYLL = [
    c + v
    for c in "b c d f g h j k l m n p r s t v w z br ch cl cr dr fl gr pl pr sh st str th tr".split()
    for v in "a e i o u ea io ou ar er or in on en".split()
]
_TAIL_TYPES, _TAIL_SHARE = 120_000, 0.12


@functools.lru_cache(1)
def _tail_words() -> list[str]:
    """A fixed open-class long tail (pseudo-words + inflections), so the vocabulary keeps growing like
    real web text does (Heaps' law) instead of saturating at a few hundred types."""
    import numpy as np

    rng = np.random.default_rng(12345)  # the lexicon itself does not depend on --seed
    syl = np.array(_SYLL, dtype=object)
    n_syl = rng.integers(2, 4, size=_TAIL_TYPES * 2)
    picks = rng.integers(0, len(syl), size=(_TAIL_TYPES * 2, 3))
    suffix = np.array(["", "", "", "s", "ed", "ing", "ly", "er", "tion", "ness"], dtype=object)
    suf = rng.integers(0, len(suffix), size=_TAIL_TYPES * 2)
    out = dict.fromkeys("".join(syl[picks[i, : n_syl[i]]]) + suffix[suf[i]] for i in range(_TAIL_TYPES * 2))
    return list(out)[:_TAIL_TYPES]


def _vocab(exclude: set[str] = frozenset()):
    import numpy as np

    words = [w for w in dict.fromkeys(_COMMON) if w not in exclude]
    weights = 1.0 / (np.arange(len(words)) + 2.7) ** 1.0  # Zipf-ish, flattened head
    words += _NAMES + _NUMBERS
    weights = np.concatenate([weights, np.full(len(_NAMES) + len(_NUMBERS), weights[-1] * 2)])
    weights *= (1 - _TAIL_SHARE) / weights.sum()
    tail = _tail_words()
    tw = 1.0 / (np.arange(len(tail)) + 10.0)
    weights = np.concatenate([weights, tw * _TAIL_SHARE / tw.sum()])
    words += tail
    return np.array(words, dtype=object), weights / weights.sum()


class _WordStream:
    """Draws words in 1M blocks with numpy, hands them out as list slices (fast)."""

    def __init__(self, rng, exclude: set[str] = frozenset(), block: int = 1 << 20):
        self.rng, self.block = rng, block
        self.words, self.p = _vocab(exclude)
        self.buf: list[str] = []
        self.pos = 0

    def take(self, n: int) -> list[str]:
        if self.pos + n > len(self.buf):
            idx = self.rng.choice(len(self.words), size=max(self.block, n), p=self.p)
            self.buf, self.pos = self.words[idx].tolist(), 0
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out


def _ri(rng, a: int, b: int) -> int:  # random.randint without its argument checking (3x faster)
    return a + int(rng.random() * (b - a + 1))


def _rr(rng, a: int, b: int) -> int:
    return a + int(rng.random() * (b - a))


def _sentence(ws: _WordStream, rng_py, n: int) -> str:
    w = ws.take(n)
    w[0] = w[0].capitalize()
    r = rng_py.random()
    if n > 8 and r < 0.45:  # a comma or two
        w[_rr(rng_py, 2, n - 2)] += ","
    if r < 0.06:
        w.insert(1, rng_py.choice(_FILLERS) + ",")
    elif r < 0.09:
        k = _rr(rng_py, 1, n)
        w[k] = f"({w[k]})"
    elif r < 0.11:
        k = _rr(rng_py, 1, n)
        w[k] = f'"{w[k]}"'
    end = "." if r < 0.8 else ("?" if r < 0.9 else ("!" if r < 0.96 else ":"))
    return " ".join(w) + end


def _paragraph(ws, rng_py, n_words: int) -> tuple[str, int]:
    out, used = [], 0
    while used < n_words:
        n = min(_ri(rng_py, 5, 26), max(n_words - used, 4))
        out.append(_sentence(ws, rng_py, n))
        used += n
    return " ".join(out), used


def _good_doc(ws, rng_py, n_words: int) -> str:
    sep = "\n\n" if rng_py.random() < 0.5 else "\n"
    parts = []
    if rng_py.random() < 0.3:  # a title line
        parts.append(" ".join(x.capitalize() for x in ws.take(_ri(rng_py, 3, 8))))
    used = 0
    while used < n_words:
        text, n = _paragraph(ws, rng_py, min(_ri(rng_py, 25, 140), n_words - used + 4))
        parts.append(text)
        used += n
    return sep.join(parts)


def _good_len(rng_py) -> int:
    r = rng_py.random()
    if r < 0.80:
        return _ri(rng_py, 100, 600)
    if r < 0.92:
        return _ri(rng_py, 600, 1500)
    return _ri(rng_py, 50, 100)


def _bad_doc(kind: str, ws, ws_nostop, rng_py) -> str:
    if kind == "short":  # gopher_short_doc
        return _paragraph(ws, rng_py, _ri(rng_py, 3, 35))[0]
    if kind == "repeated":  # dup_para / dup_line
        para = _paragraph(ws, rng_py, _ri(rng_py, 20, 60))[0]
        others = [_paragraph(ws, rng_py, _ri(rng_py, 20, 60))[0] for _ in range(_ri(rng_py, 0, 2))]
        parts = others + [para] * _ri(rng_py, 3, 8)
        rng_py.shuffle(parts)
        return ("\n\n" if rng_py.random() < 0.5 else "\n").join(parts)
    if kind == "bullets":  # gopher_too_many_bullets / fineweb short lines
        mark = rng_py.choice(["- ", "• ", "* "])
        return "\n".join(mark + " ".join(ws.take(_ri(rng_py, 3, 9))) for _ in range(_ri(rng_py, 12, 45)))
    if kind == "nostop":  # gopher_enough_stop_words
        return _good_doc(ws_nostop, rng_py, _ri(rng_py, 100, 400))
    if kind == "symbols":  # gopher_too_many_hashes / ellipsis
        w = _good_doc(ws, rng_py, _ri(rng_py, 80, 400)).split(" ")
        sym = "#" if rng_py.random() < 0.6 else "..."
        for k in range(0, len(w), _ri(rng_py, 3, 6)):
            w[k] = (sym + w[k]) if sym == "#" else (w[k] + sym)
        return " ".join(w)
    if kind == "menu":  # fineweb short_line_ratio / line_punct_ratio
        return "\n".join(
            " ".join(x.capitalize() for x in ws.take(_ri(rng_py, 1, 4))) for _ in range(_ri(rng_py, 30, 90))
        )
    raise ValueError(kind)


BAD_KINDS = {"short": 0.04, "repeated": 0.035, "bullets": 0.03, "nostop": 0.03, "symbols": 0.03, "menu": 0.015}


def make_docs(path: Path, n: int, seed: int) -> dict[str, int]:
    """Write n docs to path (jsonl, {"id", "text"}); return how many of each planted kind."""
    import random

    import numpy as np
    import orjson

    rng_py = random.Random(seed)
    rng_np = np.random.default_rng(seed)
    ws = _WordStream(rng_np)
    ws_nostop = _WordStream(np.random.default_rng(seed + 1), exclude=_STOP)
    kinds, cum = [], []
    acc = 0.0
    for k, p in BAD_KINDS.items():
        acc += p
        kinds.append(k)
        cum.append(acc)
    counts: dict[str, int] = {"good": 0, **{k: 0 for k in BAD_KINDS}}
    with open(path, "wb") as fh:
        for i in range(n):
            r = rng_py.random()
            kind = next((k for k, c in zip(kinds, cum, strict=True) if r < c), "good")
            counts[kind] += 1
            text = _good_doc(ws, rng_py, _good_len(rng_py)) if kind == "good" else _bad_doc(kind, ws, ws_nostop, rng_py)
            fh.write(orjson.dumps({"id": f"doc-{i:07d}", "text": text}))
            fh.write(b"\n")
    return counts


# --------------------------------------------------------------------------------------
# sides (each runs in its own subprocess: `curate.py --side NAME --input F --out D`)
# --------------------------------------------------------------------------------------


def _quiet_loguru() -> None:
    from loguru import logger

    logger.remove()


def side_datatrove(inp: Path, out: Path) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import ParquetWriter

    _quiet_loguru()
    ex = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(inp.parent), glob_pattern=inp.name),
            GopherQualityFilter(),
            GopherRepetitionFilter(),
            FineWebQualityFilter(),
            ParquetWriter(str(out / "data")),
        ],
        tasks=1,
        workers=1,
        logging_dir=str(out / "logs"),
    )
    ex.run()
    from datatrove.utils.text import split_into_parts

    ci = split_into_parts.cache_info()
    return {"tokenize_calls": ci.hits + ci.misses, "tokenize_cache_hits": ci.hits, "tokenize_cache_misses": ci.misses}


def _fast_split_into_words(max_lexemes: int = 1_000_000):
    """datatrove's English split_into_words(text), same tokens, but spaCy's Tokenizer is called directly
    (no sentencizer pipe) and NOT inside a per-doc memory_zone: the vocab/tokenizer caches persist across
    docs. Memory stays bounded by rebuilding the tokenizer once the vocab passes max_lexemes."""
    import spacy

    state: dict = {}

    def fresh():
        state["tok"] = spacy.blank("en").tokenizer  # what datatrove's SpaCyTokenizer("en") builds
        state["vocab"] = state["tok"].vocab

    fresh()

    @functools.lru_cache(5)
    def split_into_words(text, language="en"):
        if len(state["vocab"]) > max_lexemes:
            fresh()
        out = []
        for t in state["tok"](text):
            s = t.text.strip()
            if s:
                out.append(s)
        return out

    return split_into_words


@contextlib.contextmanager
def fast_tokenizer_patched(fast=None):
    """Point the three filter modules' split_into_words at _fast_split_into_words() (same tokens)."""
    from datatrove.pipeline.filters import fineweb_quality_filter, gopher_quality_filter, gopher_repetition_filter

    mods = (gopher_quality_filter, gopher_repetition_filter, fineweb_quality_filter)
    old = [m.split_into_words for m in mods]
    fast = fast or _fast_split_into_words()
    for m in mods:
        m.split_into_words = fast
    try:
        yield fast
    finally:
        for m, o in zip(mods, old, strict=True):
            m.split_into_words = o


def side_floor(inp: Path, out: Path, fasttok: bool = False) -> dict:
    """The same three blocks' .filter(Document), called from a plain loop: orjson in, pyarrow out."""
    import orjson
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datatrove.data import Document
    from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter

    patch = fast_tokenizer_patched() if fasttok else contextlib.nullcontext()
    patch.__enter__()  # for the life of this process; keep the reference (GC would close the generator)
    filters = [GopherQualityFilter().filter, GopherRepetitionFilter().filter, FineWebQualityFilter().filter]
    (out / "data").mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    writer = pq.ParquetWriter(out / "data" / "00000.parquet", schema, compression="snappy")
    ids, texts, dropped = [], [], 0
    loads = orjson.loads
    with open(inp, "rb") as fh:
        for line in fh:
            d = loads(line)
            doc = Document(text=d["text"], id=d["id"])
            for f in filters:
                r = f(doc)
                if r is not True and (r is False or not r[0]):
                    dropped += 1
                    break
            else:
                ids.append(doc.id)
                texts.append(doc.text)
                if len(ids) >= 1000:
                    writer.write_table(pa.table({"id": ids, "text": texts}, schema=schema))
                    ids, texts = [], []
    if ids:
        writer.write_table(pa.table({"id": ids, "text": texts}, schema=schema))
    writer.close()
    patch.__exit__(None, None, None)
    return {"dropped": dropped}


def forge_cmd(inp: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "forge.cli",
        "pipeline=curate",
        f"dataset.name={inp}",
        "dataset.format=text",
        "curate.filters=[{name: gopher_quality},{name: gopher_repetition},{name: fineweb_quality}]",
        "curate.dedup_exact=false",
        "run.progress=false",
        f"output.dir={out}",
        *extra,
    ]


# --------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------


def measure(cmd: list[str], log: Path, cwd: Path = ROOT) -> dict:
    """Run cmd; wall from outside, CPU (user+sys, incl. waited-for children) and max RSS via wait4."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "rc": proc.returncode,
        "wall_s": wall,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
        "max_rss_mb": ru.ru_maxrss / 1024,
    }


def read_kept(data_dir: Path, with_digests: bool = True) -> tuple[int, list[bytes] | None]:
    """Row count of every Parquet file under data_dir, plus a sorted digest per kept text (forge assigns
    its own ids, so the kept sets are compared by text)."""
    import hashlib

    import pyarrow.parquet as pq

    files = sorted(data_dir.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet under {data_dir}")
    n, digests = 0, ([] if with_digests else None)
    for f in files:
        pf = pq.ParquetFile(f)
        n += pf.metadata.num_rows
        if digests is not None and "text" in pf.schema_arrow.names:
            for batch in pf.iter_batches(columns=["text"], batch_size=4096):
                digests.extend(
                    hashlib.blake2b(t.encode(), digest_size=16).digest() for t in batch.column(0).to_pylist()
                )
        else:
            digests = None
    return n, (sorted(digests) if digests is not None else None)


def run_side(name: str, inp: Path, work: Path, n_docs: int) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if name == "forge":
        cmd = forge_cmd(inp, out)
    elif name == "forge_nowarmup":  # forge without its spaCy vocabulary warm-up: the loop's own gain
        cmd = forge_cmd(inp, out, "curate.vocab_warmup_rows=0")
    else:
        cmd = [sys.executable, __file__, "--side", name, "--input", str(inp), "--out", str(out)]
    r = measure(cmd, work / f"{name}.log")
    r["cmd"] = " ".join(shlex.quote(c) for c in cmd)
    if r["rc"] != 0:
        tail = (work / f"{name}.log").read_text(errors="replace").strip().splitlines()[-15:]
        r["error"] = "\n".join(tail)
        return r
    try:
        r["kept"], ids = read_kept(out / "data")
    except Exception as e:  # noqa: BLE001
        r["rc"], r["error"] = -1, f"{type(e).__name__}: {e}"
        return r
    r["_ids"] = ids
    inner = out / "inner.json"
    if inner.exists():
        r.update(json.loads(inner.read_text()))
    if name.startswith("forge") and (out / "rejected").exists():
        try:
            r["rejected"] = read_kept(out / "rejected", with_digests=False)[0]
        except Exception:  # noqa: BLE001
            pass
    r["docs_per_s"] = n_docs / r["wall_s"]
    r["docs_per_cpu_s"] = n_docs / r["cpu_s"]
    return r


def child_main(args) -> None:
    inp, out = Path(args.input), Path(args.out)
    t0, c0 = time.perf_counter(), time.process_time()
    if args.side == "datatrove":
        extra = side_datatrove(inp, out)
    elif args.side == "floor":
        extra = side_floor(inp, out)
    elif args.side == "floor_fasttok":
        extra = side_floor(inp, out, fasttok=True)
    else:
        raise SystemExit(f"unknown side {args.side}")
    extra.update(inner_wall_s=time.perf_counter() - t0, inner_cpu_s=time.process_time() - c0)
    (out / "inner.json").write_text(json.dumps(extra))


# --------------------------------------------------------------------------------------
# profile: where does datatrove's time go?
# --------------------------------------------------------------------------------------

_CATS = ("spacy tokenize", "read (orjson+Document)", "stats bookkeeping", "filter logic", "writer", "other")


def _category(key) -> str | None:
    file, _, func = key
    f = file.replace("\\", "/")
    if file == "~":
        if "orjson" in func:
            return "read (orjson+Document)"
        if "pyarrow" in func or "parquet" in func:
            return "writer"
        return None  # builtin: attribute to its callers
    if (
        f.startswith(("spacy/", "thinc/", "cymem/", "preshed/", "murmurhash/"))
        or "/spacy/" in f
        or "/thinc/" in f
        or "word_tokenizers.py" in f
        or "catalogue" in f
        or "srsly" in f
    ):
        return "spacy tokenize"
    if f.endswith("datatrove/utils/text.py"):
        return "spacy tokenize"  # split_into_parts / strip_strings glue
    if "/pipeline/readers/" in f or f.endswith("datatrove/data.py") or "/fsspec/" in f or "datatrove/io.py" in f:
        return "read (orjson+Document)"
    if (
        f.endswith("datatrove/utils/stats.py")
        or (f.endswith("datatrove/pipeline/base.py"))
        or f.endswith("contextlib.py")
    ):
        return "stats bookkeeping"
    if f.endswith("datatrove/utils/batching.py") or f.endswith("filters/base_filter.py"):
        return "stats bookkeeping"  # BaseFilter.run glue: batched(), get_filter_result, zip
    if "/pipeline/filters/" in f or "/numpy/" in f:
        return "filter logic"
    if "/pipeline/writers/" in f or "/pyarrow/" in f:
        return "writer"
    if "codecs" in f or "_bootlocale" in f:
        return "read (orjson+Document)"
    return "other"


def _profile_breakdown(stats) -> dict[str, float]:
    raw = stats.stats  # key -> (cc, nc, tt, ct, callers{caller: (cc, nc, tt, ct)})
    totals = dict.fromkeys(_CATS, 0.0)

    def cat_of(key, depth=0) -> dict[str, float]:
        c = _category(key)
        if c is not None:
            return {c: 1.0}
        callers = raw.get(key, (0, 0, 0, 0, {}))[4]
        tt = sum(v[2] for v in callers.values())
        if depth > 4 or not callers or tt <= 0:
            return {"other": 1.0}
        share: dict[str, float] = {}
        for ck, v in callers.items():
            for cc, frac in cat_of(ck, depth + 1).items():
                share[cc] = share.get(cc, 0.0) + frac * v[2] / tt
        return share

    for key, (_cc, _nc, tt, _ct, callers) in raw.items():
        if _category(key) is None and callers:
            # builtin: split its self time by caller edge
            for ck, v in callers.items():
                for c, frac in cat_of(ck).items():
                    totals[c] += v[2] * frac
        else:
            for c, frac in cat_of(key).items():
                totals[c] += tt * frac
    return totals


def profile_main(n: int, seed: int) -> None:
    import cProfile
    import io
    import pstats

    work = Path(tempfile.mkdtemp(prefix="forge-curate-prof-"))
    devnull = open(os.devnull, "w")
    quiet = lambda: contextlib.redirect_stderr(devnull)  # noqa: E731  (the executor re-adds a stderr sink)
    try:
        inp = work / "in" / "docs.jsonl"
        inp.parent.mkdir()
        make_docs(inp, n, seed)
        _quiet_loguru()

        # warm: build spaCy once so neither profile nor ablation pays for it
        from datatrove.utils.text import split_into_parts, split_into_words

        split_into_words("warm up the tokenizer.")

        # 1) cProfile of the whole executor run -------------------------------------------
        split_into_parts.cache_clear()
        prof = cProfile.Profile()
        with quiet():
            prof.enable()
            side_datatrove(inp, work / "dt_prof")
            prof.disable()
        ci = split_into_parts.cache_info()
        st = pstats.Stats(prof)
        tot = sum(v[2] for v in st.stats.values())
        cats = _profile_breakdown(st)
        print(f"\n== cProfile, datatrove LocalPipelineExecutor, {n} docs (self time {tot:.1f}s, profiler-inflated) ==")
        for c in _CATS:
            print(f"  {c:<26}{cats[c]:>8.2f}s {100 * cats[c] / tot:>6.1f}%")
        mz = sum(v[3] for k, v in st.stats.items() if k[2] == "memory_zone")
        print(f"  (spaCy memory_zone() context manager, cumulative: {mz:.2f}s)")
        print(
            f"  split_into_parts lru_cache(5): {ci.hits} hits / {ci.misses} misses for {n} docs -> the 3 filters "
            f"{'SHARE' if ci.misses <= n else 'do NOT share'} one tokenization per doc in the generator chain"
        )
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
        print("\n-- top self-time functions --")
        print("\n".join(x for x in s.getvalue().splitlines()[6:] if x.strip()))

        # 2) ablation without the profiler (CPU seconds, warm) ---------------------------
        import orjson
        import spacy
        from datatrove.data import Document
        from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.writers import ParquetWriter

        def timed(fn):
            c0 = time.process_time()
            r = fn()
            return time.process_time() - c0, r

        lines = inp.read_bytes().splitlines()
        t_orjson, dicts = timed(lambda: [orjson.loads(x) for x in lines])
        t_doc, _ = timed(lambda: [Document(text=d["text"], id=d["id"]) for d in dicts])
        t_reader, docs = timed(lambda: list(JsonlReader(str(inp.parent), glob_pattern=inp.name)()))

        split_into_parts.cache_clear()
        t_tok, ref_words = timed(lambda: [list(split_into_words(d.text)) for d in docs])
        nlp2 = spacy.blank("en")
        nlp2.add_pipe("sentencizer")
        t_nozone, _ = timed(lambda: [[t.text for t in nlp2(d.text)] for d in docs])
        fast = _fast_split_into_words()
        t_fast, fast_words = timed(lambda: [fast(d.text) for d in docs])
        same_tokens = sum(a == b for a, b in zip(ref_words, fast_words, strict=True))
        del ref_words, fast_words

        flt = {
            "gopher_quality": GopherQualityFilter(),
            "gopher_repetition": GopherRepetitionFilter(),
            "fineweb_quality": FineWebQualityFilter(),
        }
        t_logic = dict.fromkeys(flt, 0.0)
        kept = []
        tt = time.thread_time
        with fast_tokenizer_patched(fast):
            for d in docs:  # tokens come from the lru_cache: this times each filter's own logic
                fast(d.text)
                for name, f in flt.items():
                    t0 = tt()
                    r = f.filter(d)
                    t_logic[name] += tt() - t0
                    if r is not True and (r is False or not r[0]):
                        break
                else:
                    kept.append(d)

        fs = [f.filter for f in flt.values()]

        def direct():
            k = 0
            for d in docs:
                for f in fs:
                    r = f(d)
                    if r is not True and (r is False or not r[0]):
                        break
                else:
                    k += 1
            return k

        def chain():
            data = iter(docs)
            for f in (GopherQualityFilter(), GopherRepetitionFilter(), FineWebQualityFilter()):
                data = f(data, 0, 1)
            return sum(1 for _ in data)

        # both with the (warm) fast tokenizer, best of 2 each, interleaved: isolates BaseFilter.run's cost
        with fast_tokenizer_patched(fast):
            runs = [(timed(direct), timed(chain)) for _ in range(2)]
        t_direct, n_direct = min(r[0] for r in runs)
        t_chain, n_chain = min(r[1] for r in runs)
        w = ParquetWriter(str(work / "w"))

        def write():
            with w:
                for d in kept:
                    w.write(d, 0)

        t_write, _ = timed(write)
        split_into_parts.cache_clear()
        with quiet():
            t_exec, _ = timed(lambda: side_datatrove(inp, work / "dt_abl"))
        rows = [
            ("JsonlReader (orjson + Document + file_path metadata)", t_reader),
            ("  orjson.loads alone", t_orjson),
            ("  Document() alone", t_doc),
            ("datatrove split_into_words, once per doc", t_tok),
            ("  = nlp(text) inside a per-doc memory_zone, sentencizer on", None),
            ("  nlp(text) WITHOUT memory_zone (sentencizer still on)", t_nozone),
            ("  spaCy Tokenizer direct, no zone, no sentencizer (same tokens)", t_fast),
            ("filter logic, tokens already cached: gopher_quality", t_logic["gopher_quality"]),
            ("                                     gopher_repetition", t_logic["gopher_repetition"]),
            ("                                     fineweb_quality", t_logic["fineweb_quality"]),
            ("3 x .filter() direct loop (fast tokenizer, warm)", t_direct),
            ("3 filters as BaseFilter.run generator chain (fast tokenizer, warm)", t_chain),
            ("  chain - direct: batched/stat_update/track_time/update_doc_stats", t_chain - t_direct),
            (f"ParquetWriter on the {len(kept)} kept docs", t_write),
            ("full LocalPipelineExecutor", t_exec),
            (
                "  sum of parts: reader + tokenize + filter logic + writer",
                t_reader + t_tok + sum(t_logic.values()) + t_write,
            ),
        ]
        print(f"\n== ablation, CPU seconds on {n} docs (no profiler; single runs, noisy on a busy machine) ==")
        for name, t in rows:
            if t is None:
                print(f"  {name}")
                continue
            print(f"  {name:<66}{t:>7.2f}s {1e6 * t / n:>8.0f} us/doc {100 * t / t_exec:>6.1f}%")
        print(
            f"  kept: chain {n_chain}, direct {n_direct}, per-filter loop {len(kept)}; "
            f"fast tokenizer gives identical tokens on {same_tokens}/{n} docs"
        )
    finally:
        devnull.close()
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=50000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--sides",
        default="datatrove,forge,forge_nowarmup",
        help="comma list of: datatrove, forge, forge_nowarmup, floor, floor_fasttok",
    )
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--keep", type=Path, help="work dir to keep (default: a temp dir, removed)")
    ap.add_argument("--profile", type=int, metavar="N", help="profile datatrove on N docs instead")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return child_main(args)
    if args.profile:
        return profile_main(args.profile, args.seed)

    work = args.keep or Path(tempfile.mkdtemp(prefix="forge-curate-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        inp = work / "in" / "docs.jsonl"
        inp.parent.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        planted = make_docs(inp, args.docs, args.seed)
        gen_s = time.perf_counter() - t0
        bad = sum(v for k, v in planted.items() if k != "good")
        print(
            f"input: {args.docs} docs, {inp.stat().st_size / 2**20:.0f} MiB, made in {gen_s:.1f}s; "
            f"planted low-quality {bad} ({100 * bad / args.docs:.1f}%): "
            + ", ".join(f"{k}={v}" for k, v in planted.items() if k != "good")
        )
        results: dict = {
            "docs": args.docs,
            "seed": args.seed,
            "cpus": os.cpu_count(),
            "input_mib": inp.stat().st_size / 2**20,
            "planted": planted,
            "sides": {},
        }
        for name in [s.strip() for s in args.sides.split(",") if s.strip()]:
            r = run_side(name, inp, work, args.docs)
            results["sides"][name] = r
            if r["rc"] != 0:
                print(f"[{name}] FAILED (rc={r['rc']}): {r['cmd']}\n    " + r["error"].replace("\n", "\n    "))
            else:
                print(f"[{name}] done: kept {r['kept']}, wall {r['wall_s']:.1f}s, cpu {r['cpu_s']:.1f}s")
        sides = results["sides"]
        ok = {k: v for k, v in sides.items() if v["rc"] == 0}

        # agreement
        ref = ok.get("datatrove")
        if ref:
            for name, r in ok.items():
                if name == "datatrove":
                    continue
                same_n = r["kept"] == ref["kept"]
                same_ids = None
                if r.get("_ids") is not None and ref.get("_ids") is not None:
                    same_ids = r["_ids"] == ref["_ids"]
                r["agrees_with_datatrove"] = same_n and same_ids is not False
                r["same_kept_texts"] = same_ids
                if not r["agrees_with_datatrove"]:
                    print(
                        f"!!!!!! MISMATCH: {name} kept {r['kept']} vs datatrove {ref['kept']}"
                        + ("" if same_ids is None else f" (same kept texts: {same_ids})")
                        + " !!!!!!"
                    )
        for r in sides.values():
            r.pop("_ids", None)

        print(
            f"\n{'side':<15}{'docs':>8}{'kept':>8}{'wall s':>9}{'CPU s':>9}{'docs/s':>9}{'docs/CPU-s':>12}{'vs dt':>8}"
        )
        base = ref["docs_per_cpu_s"] if ref else None
        for name, r in sides.items():
            if r["rc"] != 0:
                print(f"{name:<15}{args.docs:>8}{'FAILED':>8}")
                continue
            rel = r["docs_per_cpu_s"] / base if base else float("nan")
            r["vs_datatrove_per_cpu"] = rel
            print(
                f"{name:<15}{args.docs:>8}{r['kept']:>8}{r['wall_s']:>9.1f}{r['cpu_s']:>9.1f}"
                f"{r['docs_per_s']:>9.0f}{r['docs_per_cpu_s']:>12.0f}{rel:>7.2f}x"
            )
        if ref and "forge" in ok:
            results["forge_vs_datatrove_per_cpu"] = ok["forge"]["docs_per_cpu_s"] / base
            results["forge_vs_datatrove_wall"] = ref["wall_s"] / ok["forge"]["wall_s"]
            print(
                f"\nforge / datatrove = {results['forge_vs_datatrove_per_cpu']:.2f}x docs per CPU-second "
                f"({results['forge_vs_datatrove_wall']:.2f}x wall)   (target: >= 1.3x)"
            )
        elif "forge" in sides:
            print("\nforge side failed: no forge / datatrove ratio this run")
        if ref and "forge_nowarmup" in ok:
            print(
                f"forge_nowarmup / datatrove = {ok['forge_nowarmup']['docs_per_cpu_s'] / base:.2f}x  "
                "(curate.vocab_warmup_rows=0: forge's loop, reading and writing alone)"
            )
        if ref and "floor" in ok:
            print(f"floor / datatrove = {ok['floor']['docs_per_cpu_s'] / base:.2f}x  (same filter code, no executor)")
        if ref and "floor_fasttok" in ok:
            print(
                f"floor_fasttok / datatrove = {ok['floor_fasttok']['docs_per_cpu_s'] / base:.2f}x  "
                "(same tokens via spaCy's tokenizer directly)"
            )
        print("(CPU s and wall s are measured from outside and include interpreter start and imports)")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
            print(f"wrote {args.json}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
