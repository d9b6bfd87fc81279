"""forge's classifier scoring and semantic dedup on one GPU, against vLLM's own bound and a
transformers loop.

Runs on the device: after the GPU kit's set-up call (carry .gpu/pB .gpu/bench: `source
.gpu/bench/setup.sh`), carry .gpu/pA .gpu/bench .fwhl (benchmarks/prepare_device_wheels.sh) and run
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .fwhl/*.whl
    source .gpu/bench/setup.sh; export PYTHONPATH=/tmp/site:$PYTHONPATH:$PWD FORGE_CACHE=/tmp/fcache
    python3 benchmarks/classify_gpu.py --out $OUT/classify.json --work /tmp/cw --deadline 550
(the kit built with ARCHS=qwen3-0.6b, for /tmp/vroot/model/qwen3-0.6b-dummy). Workload: N web-like documents
of 100-600 words (deterministic: paragraphs of sentences, a closing `Tags:` line), written as
JSONL; random weights of real shapes everywhere (`load_format=dummy` for vLLM, `from_config` for
transformers). Phases, each in its own process, one after the other (the next starts once
nvidia-smi shows the GPU memory released); all vLLM phases share one compile cache (forge's
default, $FORGE_CACHE/vllm, exported as VLLM_CACHE_ROOT to the offline phases):

- `classify`: `forge pipeline=score score.kind=classify classifier=fineweb_edu` through the CLI, on a
  BERT-base-shaped regression classifier this script writes (transformers' BertConfig() defaults,
  BertForSequenceClassification, num_labels 1, config only + forge's tiny byte-level BPE
  tokenizer), `classifier.engine=vllm classifier.load_format=dummy`, max_len 512. Figures:
  stats.json's model tokens/s (tokens through the model / seconds from engine-ready to the last
  batch written) and rows/s over the same window, and the wall time of the whole command;
- `bound`: vLLM's own bound: offline `LLM(runner="pooling", convert="classify")` `.classify()` of
  the exact token ids forge sends (the same tokenizer, cut to max_len), raw logits;
- `hf`: a plain transformers loop: AutoModelForSequenceClassification.from_config, bf16, sdpa,
  rows sorted by length, padded batches of at most B tokens (B the best of --hf-batch-tokens on
  the first --hf-sweep-rows rows), logits copied to the host; then the first --hf-rows rows at B;
- `classify_qwen`, `bound_qwen`: the same two on a decoder classifier: Qwen3-0.6B shapes as
  Qwen3ForSequenceClassification (num_labels 1, regression), a copy of the GPU kit's
  qwen3-0.6b dummy dir with its config edited, on the first --decoder-rows rows. On H200
  (2026-12) neither finished: the engine started, then no request completed in 300 s (forge) or
  155 s (vLLM's own LLM.classify), so the stall is vLLM's, not forge's;
- `semantic`: `forge pipeline=dedup dedup.method=semantic model=qwen3_embedding_0.6b_dummy
  dedup.semantic.embedder=model` on --semantic-rows documents, 5% of them planted exact copies.
  Seconds of each step from its marker (state/dedup/STEP/00000.done); the embeddings step's rows/s
  and tokens/s (counted with the same tokenizer) both over the whole step (engine start-up
  included) and at steady state (from its first embeddings file written to its last, files of
  --semantic-file-rows rows: `dedup.signature_rows`);
- `embed_bound`: vLLM's bound for that step: offline `LLM(runner="pooling")` `.embed()` of the
  same texts.

With dummy weights the embeddings say nothing about the texts: on H200 (2026-12) the 38,000
distinct documents (drawn from one word pool) gave 12,793 rows at cosine >= 0.9 besides the planted
copies, so the semantic phase's removal counts are not a quality figure; each distinct document
still ends in its own single-token word of the Qwen vocabulary (the `Tags:` line), so no two
distinct rows share their last (pooled) token. The classify phases pass `generation.seed=0` (the
runs of 2026-12-04 found forge handing vLLM `seed=None` when generation.seed was unset, which vLLM
refuses; fixed since: forge/stages/score/classify.py `vllm_args` leaves the seed out).

    python benchmarks/classify_gpu.py --out OUT_JSON --phases classify,bound,hf,semantic,embed_bound
    python benchmarks/classify_gpu.py --out /tmp/c.json --cpu-smoke   # here, no GPU: tiny sizes

`--cpu-smoke` checks the script without a GPU: tiny sizes, the forge phases on CPU
(classifier=tiny_cpu; dedup.semantic.embedder=lexical), the hf phase on a tiny BERT, and the vLLM
phases skipped. `--deadline S` starts no phase that could not end within S seconds of the start
(a running one is stopped at S): what did not run is listed, to run in the next call.
Writes OUT_JSON after every phase; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_throughput import device_info, record_and_exit, wait_gpu_free  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KIT_MODEL = "/tmp/vroot/model/qwen3-0.6b-dummy"
VLLM_PHASES = ("bound", "bound_qwen", "embed_bound")  # run by this script's code, so started early
FORGE_PHASES = ("classify", "classify_qwen", "semantic")
PHASES = (*FORGE_PHASES, *VLLM_PHASES, "hf")
PHASE_NEEDS_S = {"hf": 60, "semantic": 180}  # the least time a phase needs (vLLM start-up and a pass)
EXTRA_WORDS = (
    "page home blog post news read more click here contact privacy policy terms service free online "
    "best top guide tips how learn course student school teacher class lesson study research paper "
    "report review product price buy sale order shipping customer support account login search menu "
    "health food recipe travel hotel car house family children game music video photo image share "
    "comment reply like follow update today week month market business company team project work "
    "development design software web site internet mobile app phone computer network security cloud "
    "community event local world national public government law policy program service information"
).split()


def word_pool() -> list[str]:
    """Lowercase English words: forge's tiny tokenizer's corpus words plus common web words."""
    sys.path.insert(0, str(REPO))
    from forge.engine.tiny_model import _WORDS

    return sorted(set(_WORDS) | set(EXTRA_WORDS))


def tail_pool(kit_model: str, n: int) -> list[str]:
    """Single-token words of the kit's Qwen vocabulary (' word' is one token), in a seeded order;
    synthetic words when the kit's tokenizer is not there (CPU smoke run)."""
    path = Path(kit_model) / "tokenizer.json"
    if path.exists():
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=False)
        pool = sorted(t[1:] for t in vocab if t.startswith("\u0120") and t[1:].isascii() and t[1:].isalpha()
                      and len(t) >= 3)  # fmt: skip
    else:
        syll = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"]
        pool = sorted({"".join(random.Random(i).choices(syll, k=3)) for i in range(4 * n)})
    random.Random(7).shuffle(pool)
    return pool


def make_docs(n: int, tails: list[str], seed: int = 0) -> list[str]:
    """N web-like documents of 100-600 words: a title, paragraphs of 5-20-word sentences, and a
    closing `Tags:` line whose last word is tails[i] (distinct while i < len(tails))."""
    pool = word_pool()
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        target = rng.randint(100, 600)
        words = rng.choices(pool, k=target)
        title = " ".join(words[:6]).title()
        paragraphs, sentence, para, at = [], [], [], 6
        while at < target - 3:
            k = min(rng.randint(5, 20), target - 3 - at)
            s = words[at : at + k]
            at += k
            sentence = s[0].capitalize() + " " + " ".join(s[1:]) + rng.choice(".....?!")
            para.append(sentence)
            if len(para) >= rng.randint(3, 7):
                paragraphs.append(" ".join(para))
                para = []
        if para:
            paragraphs.append(" ".join(para))
        tags = f"Tags: {words[-3]}, {words[-2]}, {tails[i % len(tails)]}"
        docs.append("\n\n".join([title, *paragraphs, tags]))
    return docs


def write_jsonl(path: Path, texts: list[str], prefix: str) -> None:
    path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "text": t}) + "\n" for i, t in enumerate(texts)))


def semantic_texts(docs: list[str], n: int, copies: float, seed: int = 3) -> tuple[list[str], int]:
    """N rows: the first n - c documents and c planted exact copies of them, shuffled."""
    c = round(n * copies)
    rng = random.Random(seed)
    rows = docs[: n - c] + [docs[rng.randrange(n - c)] for _ in range(c)]
    rng.shuffle(rows)
    return rows, c


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def build_bert_dir(path: Path, smoke: bool) -> Path:
    """A BERT-base-shaped regression classifier: config + tokenizer, no weights (vLLM's dummy
    load; transformers' from_config). --cpu-smoke: a tiny one."""
    if (path / "config.json").exists():
        return path
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer, BertConfig

    from forge.engine.tiny_model import build_tokenizer

    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".bert-"))
    build_tokenizer(tmp)
    tok = AutoTokenizer.from_pretrained(tmp)
    tok.model_max_length = 512
    tok.save_pretrained(tmp)
    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    config = BertConfig(**(small if smoke else {}))
    config.architectures = ["BertForSequenceClassification"]
    config.num_labels = 1
    config.problem_type = "regression"
    config.pad_token_id = tok.pad_token_id
    config.save_pretrained(tmp)
    tmp.rename(path)
    return path


def build_qwen_cls_dir(path: Path, kit_model: str) -> Path:
    """The kit's qwen3-0.6b dummy dir as a Qwen3ForSequenceClassification regression head."""
    if not (path / "config.json").exists():
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(kit_model, tmp)
        conf = json.loads((tmp / "config.json").read_text())
        conf.update(architectures=["Qwen3ForSequenceClassification"], num_labels=1, problem_type="regression",
                    pad_token_id=conf.get("eos_token_id"))  # fmt: skip
        conf.pop("id2label", None)
        conf.pop("label2id", None)
        (tmp / "config.json").write_text(json.dumps(conf, indent=1))
        tmp.rename(path)
    return path


def classifier_dir(args: argparse.Namespace, work: Path, phase: str) -> Path:
    if phase.endswith("_qwen"):
        return work / "qwen3-0.6b-cls-dummy"
    return work / "bert-base-regression"


def phase_rows(args: argparse.Namespace, phase: str) -> int:
    return args.decoder_rows if phase.endswith("_qwen") else args.rows


def encoded(args: argparse.Namespace, work: Path, phase: str) -> list[list[int]]:
    """The token ids forge's VllmClassifier sends: the classifier's tokenizer, cut to max_len."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(classifier_dir(args, work, phase))
    texts = read_texts(work / "docs.jsonl")[: phase_rows(args, phase)]
    out: list[list[int]] = []
    for lo in range(0, len(texts), 4096):
        out += tok(texts[lo : lo + 4096], truncation=True, max_length=args.max_len)["input_ids"]
    return out


def wait_for_go(go_file: str | None) -> float:
    """Block until the parent says the GPU is free; returns when the imports were done."""
    imported = time.time()
    if go_file:
        print(f"[phase pid {os.getpid()}] imports done, waiting for the GPU", flush=True)
        while not os.path.exists(go_file):
            time.sleep(0.1)
    return imported


def run_forge(cmd: list[str], log: Path) -> tuple[float, str]:
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"forge failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-4000:]}")
    return time.time() - t0, proc.stderr


def phase_classify(args: argparse.Namespace, work: Path, phase: str) -> dict:
    """forge pipeline=score score.kind=classify through the CLI; figures from its stats.json."""
    n = phase_rows(args, phase)
    data = work / "docs.jsonl"
    if n < args.rows:  # the first n documents
        data = work / f"docs_{n}.jsonl"
        data.write_text("".join((work / "docs.jsonl").read_text().splitlines(keepends=True)[:n]))
    out = work / f"{phase}_out"
    shutil.rmtree(out, ignore_errors=True)  # a finished run dir would only be resumed: nothing measured
    model = classifier_dir(args, work, phase)
    cmd = [sys.executable, "-m", "forge.cli", "pipeline=score", "score.kind=classify", f"dataset.name={data}",
           "dataset.id_column=id", "run.progress=false", f"output.dir={out}",
           "output.examples_per_chunk=2000"]  # fmt: skip
    if args.cpu_smoke:
        cmd += ["classifier=tiny_cpu"]
    else:
        cmd += ["classifier=fineweb_edu", f"classifier.name_or_path={model}", "classifier.engine=vllm",
                "classifier.load_format=dummy", f"classifier.max_len={args.max_len}"]  # fmt: skip
    # generation.seed: forge's VllmClassifier hands vLLM `seed=None` when it is unset, which vLLM refuses
    cmd += ["generation.seed=0", *shlex.split(args.forge_overrides)]
    wall, _ = run_forge(cmd, work / f"{phase}.log")
    stats = json.loads((out / "stats.json").read_text())
    s = stats["score"]
    seconds = s["seconds_from_engine_ready"]
    quantiles = s.get("score_quantiles") or {}
    return {
        "rows": n,
        "model_tok_s": s["model_tokens_per_s"],
        "rows_s": n / seconds if seconds else None,
        "model_tokens": s["model_tokens"],
        "seconds_from_engine_ready": seconds,
        "wall_s": wall,
        "score_q50": quantiles.get("0.5"),
        "command": shlex.join(cmd[1:]),
    }


def offline_llm(args: argparse.Namespace, model: str, **kw) -> tuple[object, float]:
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(model=model, load_format="dummy", dtype="bfloat16", gpu_memory_utilization=0.9,
              enable_prefix_caching=False, seed=0, **kw)  # fmt: skip
    return llm, time.perf_counter() - t0


def phase_bound(args: argparse.Namespace, work: Path, phase: str) -> dict:
    """vLLM offline .classify() of the token ids forge sends (raw logits, as forge asks)."""
    from vllm import PoolingParams

    imported = wait_for_go(args.go_file)
    ids = encoded(args, work, phase)
    llm, startup = offline_llm(args, str(classifier_dir(args, work, phase)), runner="pooling", convert="classify",
                               max_model_len=args.max_len)  # fmt: skip
    params = PoolingParams(use_activation=False)
    prompts = [{"prompt_token_ids": t} for t in ids]
    llm.classify(prompts[:64], pooling_params=params, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.classify(prompts, pooling_params=params, use_tqdm=False)
    dt = time.perf_counter() - t0
    tokens = sum(len(t) for t in ids)
    return {"rows": len(outs), "model_tok_s": tokens / dt, "rows_s": len(outs) / dt, "model_tokens": tokens,
            "seconds": dt, "engine_startup_s": startup, "imports_done_unix": imported}  # fmt: skip


def hf_pass(model, ids: list[list[int]], budget: int, pad: int, device: str) -> dict:
    """One pass of the transformers loop over `ids` in padded batches of at most `budget` tokens."""
    import torch

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches, cur = [], []
    for i in order:
        if cur and len(ids[i]) * (len(cur) + 1) > budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    batches.append(cur)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0, tokens, out = time.time(), 0, [None] * len(ids)
    for batch in batches:
        longest = max(len(ids[i]) for i in batch)
        x = torch.full((len(batch), longest), pad, dtype=torch.long)
        attn = torch.zeros_like(x)
        for r, i in enumerate(batch):
            x[r, : len(ids[i])] = torch.tensor(ids[i])
            attn[r, : len(ids[i])] = 1
        x, attn = x.to(device), attn.to(device)
        with torch.inference_mode():
            logits = model(input_ids=x, attention_mask=attn).logits.float().cpu().numpy()  # to the host
        for r, i in enumerate(batch):
            out[i] = logits[r]
        tokens += int(attn.sum())
    sync()
    dt = time.time() - t0
    return {"batch_tokens": budget, "rows": len(ids), "seconds": dt, "model_tok_s": tokens / dt,
            "rows_s": len(ids) / dt, "model_tokens": tokens}  # fmt: skip


def phase_hf(args: argparse.Namespace, work: Path) -> dict:
    """A plain transformers loop (bf16 on cuda, sdpa, random weights of the same shapes)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    imported = wait_for_go(args.go_file)
    device = "cpu" if args.cpu_smoke else "cuda"
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    ids = encoded(args, work, "hf")
    path = classifier_dir(args, work, "hf")
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    pad = config.pad_token_id or 0
    hf_pass(model, ids[:64], 8192, pad, device)  # warm-up
    sweep = []
    for budget in map(int, args.hf_batch_tokens.split(",")):
        r = hf_pass(model, ids[: args.hf_sweep_rows], budget, pad, device)
        print(json.dumps(r), flush=True)
        sweep.append(r)
        if device == "cuda":
            torch.cuda.empty_cache()
    best = max(sweep, key=lambda r: r["model_tok_s"])
    result = hf_pass(model, ids[: args.hf_rows], best["batch_tokens"], pad, device)
    result.update(sweep=sweep, dtype=str(dtype), imports_done_unix=imported)
    return result


def phase_semantic(args: argparse.Namespace, work: Path) -> dict:
    """forge pipeline=dedup dedup.method=semantic with the model embedder; figures from its markers."""
    import pyarrow.parquet as pq

    data = work / "semantic.jsonl"
    out = work / "semantic_out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "forge.cli", "pipeline=dedup", "dedup.method=semantic", f"dataset.name={data}",
           "dataset.id_column=id", "run.progress=false", f"output.dir={out}",
           f"dedup.signature_rows={args.semantic_file_rows}"]  # fmt: skip
    if args.cpu_smoke:
        cmd += ["dedup.semantic.embedder=lexical"]
    else:
        cmd += ["model=qwen3_embedding_0.6b_dummy", f"model.name_or_path={args.kit_model}",
                "dedup.semantic.embedder=model"]  # fmt: skip
    cmd += shlex.split(args.semantic_overrides)
    wall, _ = run_forge(cmd, work / "semantic.log")
    root = out / "state" / "dedup"
    steps = {}
    for step in ("embeddings", "kmeans", "assign", "pairs", "clusters"):
        markers = sorted((root / step).glob("*.done"))
        steps[step] = [json.loads(m.read_text()) for m in markers]
    seconds = {k: round(sum(m.get("seconds", 0) for m in v), 3) for k, v in steps.items()}
    texts = read_texts(data)
    rows = len(texts)
    # steady state: from the first embeddings file written to the last (engine start-up and the
    # first file outside the window)
    written = sorted((root / "embeddings").glob("*.rows.parquet"), key=lambda p: p.stat().st_mtime)
    steady = None
    if len(written) >= 2:
        span = written[-1].stat().st_mtime - written[0].stat().st_mtime
        later = sum(pq.read_metadata(p).num_rows for p in written[1:])
        steady = {"files": len(written), "rows": later, "seconds": span, "rows_s": later / span if span else None}
    tokens = None
    if not args.cpu_smoke:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.kit_model)
        cut = [t[:8000] for t in texts]  # dedup.semantic.max_chars
        tokens = sum(len(x) for lo in range(0, rows, 4096) for x in tok(cut[lo : lo + 4096])["input_ids"])
    stats = json.loads((out / "stats.json").read_text())
    clusters = (steps["clusters"] or [{}])[0]
    result = {
        "rows": rows,
        "planted_copies": args.planted,
        "step_seconds": seconds,
        "embeddings_rows_s": rows / seconds["embeddings"] if seconds["embeddings"] else None,
        "tokens": tokens,
        "wall_s": wall,
        "removed_exact": clusters.get("exact_duplicates"),
        "removed_near": clusters.get("near_duplicates"),
        "pairs": (steps["pairs"] or [{}])[0].get("pairs"),
        "kmeans_clusters": (steps["kmeans"] or [{}])[0].get("clusters"),
        "rows_out": stats.get("rows_out", stats.get("rows_kept")),
        "command": shlex.join(cmd[1:]),
    }
    if tokens is not None and seconds["embeddings"]:
        result["embeddings_tok_s"] = tokens / seconds["embeddings"]
    if steady:
        result["steady"] = steady
        if tokens is not None and steady["rows_s"]:
            result["steady"]["tok_s"] = steady["rows_s"] * tokens / rows
    return result


def phase_embed_bound(args: argparse.Namespace, work: Path) -> dict:
    """vLLM offline .embed() of the semantic phase's texts (its own tokenization, as forge's)."""
    imported = wait_for_go(args.go_file)
    texts = [t[:8000] for t in read_texts(work / "semantic.jsonl")]
    llm, startup = offline_llm(args, args.kit_model, runner="pooling", max_model_len=8192)
    llm.embed(texts[:64], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.embed(texts, use_tqdm=False)
    dt = time.perf_counter() - t0
    tokens = sum(len(o.prompt_token_ids) for o in outs)
    return {"rows": len(outs), "rows_s": len(outs) / dt, "tok_s": tokens / dt, "tokens": tokens, "seconds": dt,
            "dims": len(outs[0].outputs.embedding), "engine_startup_s": startup,
            "imports_done_unix": imported}  # fmt: skip


def run_one_phase(args: argparse.Namespace, work: Path) -> None:
    name = args.phase_only
    try:
        if name in ("classify", "classify_qwen"):
            result = phase_classify(args, work, name)
        elif name in ("bound", "bound_qwen"):
            import vllm  # noqa: F401  imported before the GPU is free

            result = phase_bound(args, work, name)
        elif name == "hf":
            result = phase_hf(args, work)
        elif name == "semantic":
            result = phase_semantic(args, work)
        elif name == "embed_bound":
            import vllm  # noqa: F401

            result = phase_embed_bound(args, work)
        else:
            raise ValueError(f"unknown phase {name}")
    except Exception as exc:  # recorded, and the next phase still runs
        import traceback

        traceback.print_exc()
        result = {"error": f"{exc.__class__.__name__}: {str(exc)[-3000:]}"}
    record_and_exit(args.result, result)


class Phase:
    """One phase's process: started (perhaps early, waiting), then let go, then waited for."""

    def __init__(self, name: str, base: list[str], work: Path, early: bool) -> None:
        self.name = name
        self.result_path = work / f"result_{name}.json"
        self.result_path.unlink(missing_ok=True)
        self.go_file = work / f"go_{name}" if early else None
        if self.go_file:
            self.go_file.unlink(missing_ok=True)
        argv = [sys.executable, __file__, *base, "--phase-only", name, "--result", str(self.result_path)]
        if self.go_file:
            argv += ["--go-file", str(self.go_file)]
        self.proc = subprocess.Popen(argv, start_new_session=True)  # its own group: stopped whole at the deadline

    def go(self) -> None:
        if self.go_file:
            self.go_file.touch()

    def wait(self, until: float) -> dict:
        try:
            rc = self.proc.wait(timeout=None if until == float("inf") else max(1.0, until - time.time()))
        except subprocess.TimeoutExpired:
            self.stop()
            return {"error": f"phase {self.name} stopped at the deadline"}
        if rc != 0 or not self.result_path.exists():
            return {"error": f"phase {self.name} exited {rc}"}
        return json.loads(self.result_path.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def add_ratios(ph: dict) -> None:
    """forge against the transformers loop and against vLLM's own bound."""
    for forge_name, bound, hf in (("classify", "bound", "hf"), ("classify_qwen", "bound_qwen", None)):
        r = ph.get(forge_name, {})
        if r.get("model_tok_s"):
            if hf and ph.get(hf, {}).get("model_tok_s"):
                r["vs_hf"] = r["model_tok_s"] / ph[hf]["model_tok_s"]
            if ph.get(bound, {}).get("model_tok_s"):
                r["vs_bound"] = r["model_tok_s"] / ph[bound]["model_tok_s"]
    s, b = ph.get("semantic", {}), ph.get("embed_bound", {})
    if s.get("embeddings_rows_s") and b.get("rows_s"):
        s["embeddings_vs_bound"] = s["embeddings_rows_s"] / b["rows_s"]
        if (s.get("steady") or {}).get("rows_s"):
            s["steady"]["vs_bound"] = s["steady"]["rows_s"] / b["rows_s"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the results' JSON")
    ap.add_argument("--phases", default="classify,bound,hf,semantic,embed_bound")
    ap.add_argument("--kit-model", default=KIT_MODEL, help="the GPU kit's qwen3-0.6b dummy dir")
    ap.add_argument("--rows", type=int, default=50_000, help="documents of the classify phases")
    ap.add_argument("--decoder-rows", type=int, default=20_000, help="classify_qwen, bound_qwen: the first rows")
    ap.add_argument("--semantic-rows", type=int, default=40_000, help="semantic: rows, planted copies included")
    ap.add_argument("--semantic-copies", type=float, default=0.05, help="semantic: share of planted exact copies")
    ap.add_argument("--semantic-file-rows", type=int, default=4000, help="semantic: dedup.signature_rows")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--hf-rows", type=int, default=20_000, help="hf: the first rows only")
    ap.add_argument("--hf-sweep-rows", type=int, default=2000)
    ap.add_argument("--hf-batch-tokens", default="16384,32768,65536", help="hf: batch sizes tried")
    ap.add_argument("--forge-overrides", default="", help="extra Hydra overrides for the classify phases")
    ap.add_argument("--semantic-overrides", default="", help="extra Hydra overrides for the semantic phase")
    ap.add_argument("--deadline", type=float, default=0, help="seconds: start no phase that cannot end by then")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, no GPU: forge on CPU, vLLM phases skipped")
    ap.add_argument("--no-early-start", action="store_true")
    ap.add_argument("--work", default=None)
    ap.add_argument("--planted", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--phase-only", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--go-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    for phase in filter(None, args.phases.split(",")):
        if phase not in PHASES:
            ap.error(f"unknown phase {phase!r}: one of {', '.join(PHASES)}")
    if args.cpu_smoke and not args.phase_only:
        args.rows, args.decoder_rows, args.semantic_rows = min(args.rows, 200), min(args.decoder_rows, 50), 200
        args.hf_rows, args.hf_sweep_rows, args.semantic_file_rows = min(args.hf_rows, 200), 100, 50
        args.hf_batch_tokens = "4096,8192"
    return args


def prepare(args: argparse.Namespace, work: Path, phases: list[str]) -> None:
    """The documents, the semantic rows and the classifier dirs, once per work dir."""
    t0 = time.perf_counter()
    n = max(args.rows, args.semantic_rows)
    tails = tail_pool(args.kit_model, n)
    docs = make_docs(n, tails)
    write_jsonl(work / "docs.jsonl", docs[: args.rows], "d")
    rows, args.planted = semantic_texts(docs, args.semantic_rows, args.semantic_copies)
    unique = args.semantic_rows - args.planted
    if unique > len(tails):
        print(f"warning: {unique} distinct semantic rows but {len(tails)} distinct last tokens", flush=True)
    write_jsonl(work / "semantic.jsonl", rows, "s")
    build_bert_dir(work / "bert-base-regression", args.cpu_smoke)
    if any(p.endswith("_qwen") for p in phases):
        build_qwen_cls_dir(work / "qwen3-0.6b-cls-dummy", args.kit_model)
    words = [len(d.split()) for d in docs[: args.rows]]
    print(f"prepared {args.rows} documents ({min(words)}-{max(words)} words, mean {sum(words) / len(words):.0f}), "
          f"{args.semantic_rows} semantic rows ({args.planted} planted copies) in {time.perf_counter() - t0:.1f} s",
          flush=True)  # fmt: skip


def main() -> None:
    args = parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="forge-classify-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("FORGE_CACHE", Path.home() / ".cache" / "forge")) / "vllm"
    os.environ["VLLM_CACHE_ROOT"] = str(cache)  # forge's default compile cache: the offline phases share it
    if args.phase_only:
        run_one_phase(args, work)
    t_all = time.time()
    until = t_all + args.deadline if args.deadline else float("inf")
    phases = [p for p in args.phases.split(",") if p]
    if args.cpu_smoke:
        phases = [p for p in phases if p not in VLLM_PHASES and p != "classify_qwen"]
    prepare(args, work, phases)
    from importlib.metadata import PackageNotFoundError, version

    try:
        vllm_version = version("vllm")
    except PackageNotFoundError:
        vllm_version = None
    results: dict = {"date": time.strftime("%Y-%m-%d"), "vllm": vllm_version, "device": device_info(),
                     "rows": args.rows, "decoder_rows": args.decoder_rows, "semantic_rows": args.semantic_rows,
                     "max_len": args.max_len, "work": str(work), "phases": {}, "not_run": []}  # fmt: skip
    base = ["--out", args.out, "--work", str(work), "--kit-model", args.kit_model, "--rows", str(args.rows),
            "--decoder-rows", str(args.decoder_rows), "--max-len", str(args.max_len), "--hf-rows", str(args.hf_rows),
            "--hf-sweep-rows", str(args.hf_sweep_rows), "--hf-batch-tokens", args.hf_batch_tokens,
            "--semantic-rows", str(args.semantic_rows), "--semantic-file-rows", str(args.semantic_file_rows),
            "--planted", str(args.planted), f"--forge-overrides={args.forge_overrides}",
            f"--semantic-overrides={args.semantic_overrides}"]  # fmt: skip
    if args.cpu_smoke:
        base.append("--cpu-smoke")
    pending: Phase | None = None
    for i, name in enumerate(phases):
        need = PHASE_NEEDS_S.get(name, 120)
        if time.time() + need > until:
            results["not_run"] = phases[i:]
            print(f"[{time.time() - t_all:6.1f} s] deadline: not run: {','.join(phases[i:])}", flush=True)
            break
        waited = wait_gpu_free() if not args.cpu_smoke else 0.0
        current = pending if pending and pending.name == name else Phase(name, base, work, early=False)
        current.go()
        t0 = time.time()
        print(f"[{t0 - t_all:6.1f} s] phase {name} goes (GPU free after {waited:.1f} s)", flush=True)
        nxt = phases[i + 1] if i + 1 < len(phases) else None
        early = nxt in (*VLLM_PHASES, "hf") and not args.no_early_start
        pending = Phase(nxt, base, work, early=True) if early else None
        result = current.wait(until)
        result["phase_s"] = time.time() - t0
        result["gpu_free_wait_s"] = waited
        results["phases"][name] = result
        results["elapsed_s"] = time.time() - t_all
        add_ratios(results["phases"])
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"[{time.time() - t_all:6.1f} s] PHASE {name}: {json.dumps(result)}", flush=True)
    if pending is not None:
        pending.stop()
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_tables(results)


def print_tables(results: dict) -> None:
    ph, nan = results["phases"], float("nan")
    print(f"\n{results['device']}, vllm {results['vllm']}, max_len {results['max_len']}")
    head = f"{'rows':>8}{'model tok/s':>14}{'rows/s':>10}{'vs hf':>8}{'vs bound':>10}{'phase s':>9}"
    print(f"{'classify path':<16}{head}")
    for name in ("classify", "bound", "hf", "classify_qwen", "bound_qwen"):
        r = ph.get(name)
        if r:
            print(f"{name:<16}{r.get('rows') or 0:>8}{r.get('model_tok_s') or nan:>14,.0f}"
                  f"{r.get('rows_s') or nan:>10,.0f}{r.get('vs_hf', nan):>8.2f}{r.get('vs_bound', nan):>10.3f}"
                  f"{r.get('phase_s', nan):>9.0f}"
                  + (f"  ERROR {r['error'][:300]}" if "error" in r else ""))  # fmt: skip
    s, b = ph.get("semantic"), ph.get("embed_bound")
    if s:
        if "error" in s:
            print(f"semantic: ERROR {s['error'][:1500]}")
        else:
            print(f"\nsemantic dedup, {s['rows']} rows ({s['planted_copies']} planted copies): removed "
                  f"{s.get('removed_exact')} exact + {s.get('removed_near')} near; {s.get('pairs')} pairs; "
                  f"{s.get('kmeans_clusters')} k-means clusters; wall {s['wall_s']:.0f} s")  # fmt: skip
            print("step seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in s["step_seconds"].items()))
            st = s.get("steady") or {}
            print(f"embeddings step: {s.get('embeddings_rows_s') or nan:,.0f} rows/s, "
                  f"{s.get('embeddings_tok_s') or nan:,.0f} tok/s (start-up included; vs bound "
                  f"{s.get('embeddings_vs_bound', nan):.3f}); steady {st.get('rows_s') or nan:,.0f} rows/s, "
                  f"{st.get('tok_s') or nan:,.0f} tok/s (vs bound {st.get('vs_bound', nan):.3f})")  # fmt: skip
    if b:
        if "error" in b:
            print(f"embed_bound: ERROR {b['error'][:1500]}")
        else:
            print(f"embed_bound: {b['rows_s']:,.0f} rows/s, {b['tok_s']:,.0f} tok/s ({b['tokens']:,} tokens, "
                  f"{b['seconds']:.1f} s, start-up {b['engine_startup_s']:.0f} s)")  # fmt: skip
    if results.get("not_run"):
        print(f"not run (deadline): {','.join(results['not_run'])}")
    print(f"all phases: {results.get('elapsed_s', 0):.0f} s")


if __name__ == "__main__":
    main()
