"""forge `pipeline=tokenize` vs datatrove 0.10.1's DocumentTokenizer, side by side in one run, and
the loader's read speed.

Same corpus (>= 200 MB of text this script makes: documents of Zipf-distributed words, 8 Parquet
files), same tokenizer (a 32,000-token byte-level BPE trained here on the corpus's first 20 MB,
saved as tokenizer.json and as a transformers dir), same parallelism (2 processes each), EOS after
every document, token ids written to disk:

- forge: the real CLI, `forge pipeline=tokenize dataset.name=<dir> dataset.text_column=text
  tokenize.format=megatron tokenize.workers=2` (Megatron .bin/.idx + mask, index.json);
- datatrove: ParquetReader -> DocumentTokenizer(eos_token, shuffle_documents=False: its cheapest
  setting, no second pass) on LocalPipelineExecutor(tasks=2, workers=2).

Megatron-LM's tools/preprocess_data.py is not in the megatron-core wheel (PyPI), so it is not run.

Each side runs twice, each time in its own process: pinned to one core (`taskset -c 0`, one
worker, RAYON_NUM_THREADS=1: tokens per second are tokens per core) and on every core (forge
tokenize.workers=N, datatrove tasks=workers=N). Prints tokens/s and the ratios, then
forge.data.TokenShards' read speed at seq_len 4096 from page cache on one core, per item (`ds[i]`)
and per batch of 64 (`ds.__getitems__`, what torch's DataLoader calls).

    python benchmarks/tokenize_bench.py [--mb 200] [--work /tmp/forge_tok_bench]
"""

from __future__ import annotations

import sys
from pathlib import Path

# this file's name is the standard library's `tokenize` (which pandas, inspect, linecache import):
# take its folder off the import path before anything imports that
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
ROOT = _HERE.parent
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402


def make_corpus(out: Path, mb: int, files: int = 8) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    vocab = ["".join(rng.choice(letters, rng.integers(2, 11))) for _ in range(50_000)]
    ranks = np.arange(1, len(vocab) + 1)
    p = 1.0 / ranks**1.1
    p /= p.sum()
    out.mkdir(parents=True, exist_ok=True)
    written = docs = 0
    per_file = mb * 1_000_000 // files
    for f in range(files):
        texts, size = [], 0
        while size < per_file:
            words = rng.choice(len(vocab), size=int(rng.integers(50, 800)), p=p)
            text = " ".join(vocab[w] for w in words) + "."
            texts.append(text)
            size += len(text)
        ids = [f"f{f}_{i}" for i in range(len(texts))]
        pq.write_table(pa.table({"id": ids, "text": texts}), out / f"part_{f}.parquet")
        written += size
        docs += len(texts)
    return docs


def train_tokenizer(corpus: Path, out: Path) -> None:
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = pq.read_table(sorted(corpus.glob("*.parquet"))[0], columns=["text"]).column("text").to_pylist()
    sample, size = [], 0
    for t in texts:
        sample.append(t)
        size += len(t)
        if size > 20_000_000:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=32_000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, as real byte-level BPEs have
        show_progress=False,
    )
    tok.train_from_iterator(sample, trainer)
    out.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_forge(corpus: Path, tok: Path, work: Path, workers: int) -> dict:
    out = work / "forge_out"
    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    subprocess.run(
        [sys.executable, "-m", "forge.cli", "pipeline=tokenize", f"dataset.name={corpus}", "dataset.text_column=text",
         f"tokenize.tokenizer={tok}", "tokenize.format=megatron", f"tokenize.workers={workers}", "run.progress=false",
         "output.examples_per_chunk=20000", f"output.dir={out}"],
        cwd=work, check=True, capture_output=True, text=True,
    )  # fmt: skip
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    index = json.loads((out / "index.json").read_text())
    tokens = sum(s["tokens"] for s in index["sources"].values())
    docs = sum(s["documents"] for s in index["sources"].values())
    return {"tokens": tokens, "documents": docs, "wall_s": wall, "cpu_s": cpu}


def run_datatrove(corpus: Path, tok: Path, work: Path, workers: int) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from loguru import logger

    logger.remove()
    out = work / "datatrove_out"
    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    LocalPipelineExecutor(
        [
            ParquetReader(str(corpus), glob_pattern="*.parquet", text_key="text", id_key="id"),
            DocumentTokenizer(
                str(out / "tokens"),
                tokenizer_name_or_path=str(tok / "tokenizer.json"),
                eos_token="<|endoftext|>",
                shuffle_documents=False,
            ),
        ],
        tasks=workers,
        workers=workers,
        logging_dir=str(out / "logs"),
    ).run()
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    tokens = sum(f.stat().st_size for f in (out / "tokens").glob("*.ds")) // 2  # uint16 ids
    return {"tokens": tokens, "wall_s": wall, "cpu_s": cpu}


def loader_speed(run: Path, seq_len: int = 4096, seconds: float = 3.0) -> dict:
    import numpy as np

    from forge.data import TokenShards

    ds = TokenShards(run, seq_len)
    n = len(ds)
    order = np.random.default_rng(0).permutation(n)
    for i in order[: min(n, 2000)]:  # warm the page cache
        ds[int(i)]
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in order[:10_000]:
            ds[int(i)]
        done += min(n, 10_000)
    item = done / (time.perf_counter() - t0)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in range(0, min(n, 10_000), 64):
            ds.__getitems__(order[b : b + 64].tolist())
        done += min(n, 10_000)
    batch = done / (time.perf_counter() - t0)
    return {"sequences": n, "per_item_seq_s": round(item), "per_batch64_seq_s": round(batch)}


def side(name: str, work: Path, workers: int) -> None:
    corpus, tok = work / "corpus", work / "tokenizer"
    run = run_forge if name == "forge" else run_datatrove
    result = run(corpus, tok, work, workers)
    result["tokens_per_s"] = round(result["tokens"] / result["wall_s"])
    print(json.dumps({"side": name, "workers": workers, **result}))


def measure(name: str, work: Path, workers: int) -> dict:
    """One side in its own process: on one pinned core (`taskset`, one worker, one tokenizer
    thread: tokens per wall-second are tokens per core), or on every core."""
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"} if workers == 1 else None
    pin = ["taskset", "-c", "0"] if workers == 1 and shutil.which("taskset") else []
    cmd = [*pin, sys.executable, __file__, "--work", str(work), "--side", name, "--workers", str(workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--work", type=Path, default=Path("/tmp/forge_tok_bench"))
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        side(args.side, args.work, args.workers)
        return
    corpus, tok = args.work / "corpus", args.work / "tokenizer"
    if not (tok / "tokenizer.json").exists():
        t = time.perf_counter()
        docs = make_corpus(corpus, args.mb)
        train_tokenizer(corpus, tok)
        print(f"made {args.mb} MB of text ({docs:,} documents) and a 32k BPE in {time.perf_counter() - t:.0f} s")
    cores = len(os.sched_getaffinity(0))
    results = {}
    for workers in (1, cores):
        for name in ("forge", "datatrove"):
            results[name, workers] = measure(name, args.work, workers)
            print(json.dumps(results[name, workers]))
    f, d = results["forge", 1], results["datatrove", 1]
    assert f["tokens"] == d["tokens"], "the two sides wrote different token counts"
    print(f"tokens: {f['tokens']:,} (both sides)")
    print(f"one pinned core: forge {f['tokens_per_s']:,} tok/s, datatrove {d['tokens_per_s']:,} tok/s")
    print(f"forge / datatrove per core: {f['tokens_per_s'] / d['tokens_per_s']:.2f}x")
    fa, da = results["forge", cores], results["datatrove", cores]
    print(
        f"{cores} cores: forge {fa['tokens_per_s']:,} tok/s ({fa['wall_s']:.1f} s), "
        f"datatrove {da['tokens_per_s']:,} tok/s ({da['wall_s']:.1f} s): {da['wall_s'] / fa['wall_s']:.2f}x"
    )
    print("loader (seq_len 4096, one core, page cache):", json.dumps(loader_speed(args.work / "forge_out")))


if __name__ == "__main__":
    main()
