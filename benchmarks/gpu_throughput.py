"""Output tokens/s on one GPU: raw vLLM offline vs datatrove 0.10.1's InferenceRunner vs forge.

Runs on the device (see benchmarks/RESULTS.md for the exact calls). The kit's workload: N chat
prompts of W random single-token words (~160 prompt tokens with the template), max_tokens 1024,
ignore_eos, temperature 0.8, top_p 1, top_k 0, dummy weights. Throughput is counted over
`LLM.chat` for offline and from engine/server-ready to the last answer for datatrove and forge.

Each phase runs in its own process, one after the other (the GPU is free between them; the next
starts only once nvidia-smi shows the memory released). All phases share one compile cache,
`--compile-cache` (default: forge's own default, $FORGE_CACHE/vllm), exported as VLLM_CACHE_ROOT to
offline and datatrove's `vllm serve`; forge puts its cache there by default. A tiny run of the same
phases (`--n 64 --max-tokens 32`) in an earlier call warms it, so no phase compiles cold.
The script's own phase processes (offline, datatrove) are started early and do their Python
imports while the previous phase's engine starts; they touch the GPU only when told to go.
Writes OUT_JSON after every phase; prints a table last.

    python benchmarks/gpu_throughput.py MODEL_DIR OUT_JSON --phases offline,datatrove,forge
    python benchmarks/gpu_throughput.py MODEL_DIR OUT_JSON --phases forge,tp2,dp2 \\
        --variant tp2=model.tp=2 --variant dp2=model.dp=2

Phases: `offline`, `async` (raw AsyncLLM with offline's settings, every prompt submitted at once:
forge's gap to offline split into AsyncLLM's own and forge's), `offline3` (raw vLLM doing
rollout3's three steps as three batch waves),
`datatrove`, `forge` (forge's defaults: model=qwen3_1.7b_dummy, vllm_async),
`rollout3` (forge with rollout=critique_revise: draft -> critique -> revise, three dependent
requests per row at the workload's sampling, each with a third of --max-tokens, so a row gets the
same output budget as in `forge` and its sequences stay as long: what differs is only that step
k+1 must wait for step k; compare it with `forge` in the same call), `rollout3full` (the same
with --max-tokens per step: three times the output, on sequences up to ~3x longer),
`rollout3chain` (rollout=self_refine: the three steps in one growing conversation, each prompt the
last one's prompt and answer plus a turn, so the prefix cache can serve it) against
`offline3chain` (raw vLLM doing the same as three waves of LLM.chat; both report vLLM's
prefix-cache hit rate, from num_cached_tokens), any phase again as `NAME#k` (its k-th run in the
call; its ratios use the references of the same round, e.g. `offline,forge,offline#2,forge#2`),
`forge:ENGINE` (model.engine=ENGINE), or a NAME defined by `--variant NAME=OVERRIDES` (a forge run
with extra space-separated Hydra overrides). `--forge-overrides` applies to every forge phase.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLING = {"temperature": 0.8, "top_p": 1.0, "top_k": 0}
OWN_PHASES = (
    "offline",
    "async",
    "offline3",
    "offline3chain",
    "datatrove",
)  # run by this script's code, so they can be started early
SCORE_PHASES = ("score", "score_hf", "prefill")  # forge pipeline=score vs a transformers loop vs vLLM prefill


def make_texts(tokenizer_json: str, n: int, words: int, seed: int = 0) -> list[str]:
    """N prompts of W random lowercase words, each one ' word' token of the model's vocab."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(tokenizer_json).get_vocab(with_added_tokens=False)
    pool = sorted(
        t[1:]
        for t in vocab
        if t.startswith("\u0120") and t[1:].isascii() and t[1:].isalpha() and t[1:].islower() and 3 <= len(t) - 1 <= 10
    )
    rng = random.Random(seed)
    return [" ".join(rng.choice(pool) for _ in range(words)) for _ in range(n)]


def default_compile_cache() -> Path:
    """forge's default model.compile_cache_dir (forge/engine/compile_cache.py), without importing forge."""
    return Path(os.environ.get("FORGE_CACHE", Path.home() / ".cache" / "forge")) / "vllm"


def compile_entries(cache: Path) -> set[str]:
    """The torch.compile cache's entries (one per engine-config hash, plus AOT-compiled functions)."""
    root = cache / "torch_compile_cache"
    entries = {p.name for p in root.iterdir() if p.name != "torch_aot_compile"} if root.is_dir() else set()
    aot = root / "torch_aot_compile"
    return entries | ({f"aot/{p.name}" for p in aot.iterdir()} if aot.is_dir() else set())


def wait_for_go(go_file: str | None) -> float:
    """Block until the parent says the GPU is free; returns when the imports were done."""
    imported = time.time()
    if go_file:
        print(f"[phase pid {os.getpid()}] imports done, waiting for the GPU", flush=True)
        while not os.path.exists(go_file):
            time.sleep(0.1)
    return imported


def offline_kwargs(args: argparse.Namespace) -> dict:
    """The raw engines' settings (offline `LLM` and the `async` phase's AsyncLLM)."""
    return {
        "model": args.model,
        "load_format": "dummy",
        "dtype": "bfloat16",
        "gpu_memory_utilization": 0.9,
        "max_model_len": 4096,
        "seed": 0,
        "max_num_seqs": args.offline_max_num_seqs,
    }


def offline_llm(args: argparse.Namespace) -> tuple[object, float]:
    """Raw vLLM as the offline phases run it: (LLM, start-up seconds)."""
    from vllm import LLM

    t_start = time.perf_counter()
    llm = LLM(**offline_kwargs(args))
    return llm, time.perf_counter() - t_start


def phase_offline(args: argparse.Namespace, texts: list[str]) -> dict:
    from vllm import SamplingParams

    imported = wait_for_go(args.go_file)
    llm, startup = offline_llm(args)
    prompts = [[{"role": "user", "content": t}] for t in texts]
    llm.chat(prompts[:8], SamplingParams(max_tokens=16, ignore_eos=True, **SAMPLING), use_tqdm=False)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, **SAMPLING)
    window_start = time.time()
    t0, cpu0 = time.perf_counter(), time.thread_time()
    outs = llm.chat(prompts, params, use_tqdm=False)
    wall, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
    out_tok = sum(len(c.token_ids) for o in outs for c in o.outputs)
    in_tok = sum(len(o.prompt_token_ids) for o in outs)
    return {
        "output_tok_s": out_tok / wall,
        "input_tok_s": in_tok / wall,
        "wall_s": wall,
        "output_tokens": out_tok,
        "engine_startup_s": startup,
        "max_num_seqs": args.offline_max_num_seqs,
        "main_thread_busy": cpu / wall,  # vLLM's output handling, as forge's loop_busy
        "imports_done_unix": imported,
        "window_unix": [window_start, window_start + wall],
    }


def phase_async(args: argparse.Namespace, texts: list[str]) -> dict:
    """Raw AsyncLLM (the engine forge runs in process) with offline's settings, every prompt
    submitted at once as LLM.chat does, prompts rendered and tokenized as forge does: splits
    forge's gap to offline into AsyncLLM's own (async vs offline) and forge's (forge vs async)."""
    import asyncio
    import uuid

    from transformers import AutoTokenizer
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    imported = wait_for_go(args.go_file)
    tok = AutoTokenizer.from_pretrained(args.model)

    async def run() -> dict:
        t_start = time.perf_counter()
        # LLM's usage context: the same defaults (max_num_batched_tokens) and compile-cache entry as offline
        engine_args = AsyncEngineArgs(**offline_kwargs(args), disable_log_stats=True)
        llm = AsyncLLM.from_engine_args(engine_args, usage_context=UsageContext.LLM_CLASS)
        startup = time.perf_counter() - t_start

        async def one(text: str, params: SamplingParams) -> object:
            chat = [{"role": "user", "content": text}]
            rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            ids = tok(rendered, add_special_tokens=False)["input_ids"]
            final = None
            async for out in llm.generate({"prompt_token_ids": ids}, params, uuid.uuid4().hex):
                final = out
            return final

        def sampling(max_tokens: int) -> SamplingParams:
            return SamplingParams(
                max_tokens=max_tokens, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY, **SAMPLING
            )

        try:
            await asyncio.gather(*(one(t, sampling(16)) for t in texts[:8]))  # as offline's warm-up call
            params = sampling(args.max_tokens)
            t0, cpu0 = time.perf_counter(), time.thread_time()
            outs = await asyncio.gather(*(one(t, params) for t in texts))
            wall, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
        finally:
            llm.shutdown()
        out_tok = sum(len(o.outputs[0].token_ids) for o in outs)
        return {
            "output_tok_s": out_tok / wall,
            "wall_s": wall,
            "output_tokens": out_tok,
            "engine_startup_s": startup,
            "max_num_seqs": args.offline_max_num_seqs,
            "main_thread_busy": cpu / wall,
            "imports_done_unix": imported,
        }

    return asyncio.run(run())


def phase_offline3(args: argparse.Namespace, texts: list[str], chain: bool = False) -> dict:
    """Raw vLLM doing rollout3's work without forge: draft, critique and revise as three batch waves
    of LLM.chat (each wave waits for the whole previous one), with the prompts of
    conf/rollout/critique_revise.yaml and a third of --max-tokens per step, as rollout3 sends them.
    chain=True (`offline3chain`): conf/rollout/self_refine.yaml's one growing conversation, as
    rollout3chain sends it; vLLM's prefix cache is on (its default) and may serve each wave's
    earlier turns, as far as their text re-tokenizes to the same ids."""
    import re

    import yaml
    from vllm import SamplingParams

    conf = "self_refine" if chain else "critique_revise"
    prompts = yaml.safe_load((REPO / "conf" / "rollout" / f"{conf}.yaml").read_text())["prompts"]

    def render(name: str, **fields: str) -> str:
        return re.sub(r"\{([A-Za-z_]\w*)\}", lambda m: fields.get(m.group(1), m.group(0)), prompts[name])

    imported = wait_for_go(args.go_file)
    llm, startup = offline_llm(args)
    params = SamplingParams(max_tokens=args.max_tokens // 3, ignore_eos=True, **SAMPLING)
    llm.chat([[{"role": "user", "content": texts[0]}]], SamplingParams(max_tokens=16, ignore_eos=True, **SAMPLING))
    prompt_tokens = cached_tokens = 0

    def wave(conversations: list) -> list:
        nonlocal prompt_tokens, cached_tokens
        outs = llm.chat(conversations, params, use_tqdm=False)
        prompt_tokens += sum(len(o.prompt_token_ids) for o in outs)
        cached_tokens += sum(o.num_cached_tokens or 0 for o in outs)
        return outs

    def follow(conversation: list, answer: str, turn: str) -> list:
        """The conversation, its answer, and the next user turn."""
        return [*conversation, {"role": "assistant", "content": answer}, {"role": "user", "content": turn}]

    t0, cpu0 = time.perf_counter(), time.thread_time()
    first = [[{"role": "user", "content": t}] for t in texts]
    drafts = [o.outputs[0].text for o in wave(first)]
    if chain:
        asks = [follow(m, d, render("critique")) for m, d in zip(first, drafts, strict=True)]
    else:
        critique = [render("critique", question=t, answer=d) for t, d in zip(texts, drafts, strict=True)]
        asks = [[{"role": "user", "content": c}] for c in critique]
    critiques = [o.outputs[0].text for o in wave(asks)]
    if chain:
        turns = [follow(a, c, render("revise")) for a, c in zip(asks, critiques, strict=True)]
    else:
        revise = [render("revise", critique=c) for c in critiques]
        turns = [follow(m, d, r) for m, d, r in zip(first, drafts, revise, strict=True)]
    outs = wave(turns)
    wall, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
    out_tok = len(texts) * 2 * (args.max_tokens // 3) + sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {
        "output_tok_s": out_tok / wall,
        "wall_s": wall,
        "output_tokens": out_tok,
        "prompt_tokens": prompt_tokens,
        "prefix_cache_hit_rate": cached_tokens / prompt_tokens if prompt_tokens else None,
        "main_thread_busy": cpu / wall,
        "engine_startup_s": startup,
        "max_num_seqs": args.offline_max_num_seqs,
        "imports_done_unix": imported,
    }


def phase_datatrove(args: argparse.Namespace, data: Path, work: Path) -> dict:
    import vllm  # noqa: F401  datatrove imports it for its compile-lock hash; do it before the GPU is free
    from datatrove.pipeline.inference.run_inference import InferenceConfig, InferenceRunner
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import ParquetWriter
    from loguru import logger

    docs = list(JsonlReader(str(data.parent), glob_pattern=data.name, text_key="prompt", id_key="id")())
    imported = wait_for_go(args.go_file)
    marks = {"ready": None, "ready_unix": None, "dt_ready": None, "last": None, "tokens": 0}

    def server_ready(message) -> None:  # datatrove forwards the server's output lines
        text = str(message)
        if marks["ready"] is None and "Application startup complete" in text:
            marks["ready"], marks["ready_unix"] = time.perf_counter(), time.time()
        if marks["dt_ready"] is None and "server is ready." in text:  # datatrove's own poll (every 5 s)
            marks["dt_ready"] = time.perf_counter()

    logger.add(server_ready, level="INFO")

    async def rollout(doc, generate):
        result = await generate(
            {
                "messages": [{"role": "user", "content": doc.text}],
                "max_tokens": args.max_tokens,
                "ignore_eos": True,
                **SAMPLING,
            }
        )
        marks["last"] = time.perf_counter()
        marks["tokens"] += int(result.usage.get("completion_tokens", 0))
        return result.text

    runner = InferenceRunner(
        rollout_fn=rollout,
        config=InferenceConfig(
            server_type="vllm",
            model_name_or_path=args.model,
            model_max_context=4096,
            max_concurrent_generations=512,
            metric_interval=3600,
            server_log_folder=str(work / "dt_logs"),
            model_kwargs={"load-format": "dummy", "dtype": "bfloat16", "gpu-memory-utilization": 0.9, "seed": 0},
        ),
        output_writer=ParquetWriter(str(work / "dt_out"), output_filename="${rank}_chunk_${chunk_index}.parquet"),
        checkpoints_local_dir=str(work / "dt_ckpt"),
        records_per_chunk=500,
    )
    t0 = time.perf_counter()
    runner.run(iter(docs), rank=0, world_size=1)
    window = marks["last"] - marks["ready"]  # its rollouts start before the server is ready
    result = {
        "output_tok_s": marks["tokens"] / window,
        "wall_s": window,
        "output_tokens": marks["tokens"],
        "engine_startup_s": marks["ready"] - t0,
        "total_incl_startup_s": time.perf_counter() - t0,
        "max_concurrent_generations": 512,
        "imports_done_unix": imported,
        "window_unix": [marks["ready_unix"], marks["ready_unix"] + window],
    }
    if marks["dt_ready"] is not None:  # from when datatrove's poll saw the server ready
        result["output_tok_s_from_dt_ready"] = marks["tokens"] / (marks["last"] - marks["dt_ready"])
        result["dt_ready_lag_s"] = marks["dt_ready"] - marks["ready"]
    return result


def kind_of(phase: str) -> str:
    """A phase's kind: `forge#2` (the second run of `forge` in one call) is a `forge` phase."""
    return phase.partition("#")[0]


def forge_overrides(args: argparse.Namespace, phase: str) -> list[str]:
    """The extra Hydra overrides of a forge phase: forge:ENGINE, or a --variant, plus --forge-overrides."""
    extra = shlex.split(args.forge_overrides or "")
    phase = kind_of(phase)
    if phase.startswith("forge:"):
        return [f"model.engine={phase.split(':', 1)[1]}", *extra]
    if phase == "forge":
        return extra
    if phase == "rollout3":
        return ["rollout=critique_revise", "rollout.rounds=1", f"generation.max_tokens={args.max_tokens // 3}", *extra]
    if phase == "rollout3chain":
        return ["rollout=self_refine", "rollout.rounds=1", f"generation.max_tokens={args.max_tokens // 3}", *extra]
    if phase == "rollout3full":
        return ["rollout=critique_revise", "rollout.rounds=1", *extra]
    return [*shlex.split(args.variants[phase]), *extra]


def phase_forge(args: argparse.Namespace, data: Path, work: Path, phase: str) -> dict:
    out = work / phase.replace(":", "_")
    overrides = forge_overrides(args, phase)
    cmd = [
        sys.executable,
        "-m",
        "forge.cli",
        "model=qwen3_1.7b_dummy",
        f"model.name_or_path={args.model}",
        f"dataset.name={data}",
        "dataset.id_column=id",
        f"generation.max_tokens={args.max_tokens}",
        "generation.temperature=0.8",
        "generation.top_p=1.0",
        "generation.top_k=0",
        "+generation.extra_body.ignore_eos=true",
        f"output.dir={out}",
        "run.progress=false",
        "output.examples_per_chunk=500",
    ]
    if Path(args.compile_cache).resolve() != default_compile_cache().resolve():
        cmd.append(f"model.compile_cache_dir={args.compile_cache}")
    cmd += overrides
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (work / f"{out.name}.stderr.log").write_text(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"forge failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    session = json.loads((out / "stats.json").read_text())["last_sessions"][0]
    # stats.json times forge from its first request; the peers here are timed from server-ready,
    # so forge is too: its window gets the gap between engine-ready and its first request back
    window = session["generation_s"] + (session.get("first_request_after_ready_s") or 0.0)
    return {
        "output_tok_s": session["tokens_out"] / window,
        "output_tok_s_from_first_request": session["output_tokens_per_s"],
        "wall_s": window,
        "output_tokens": session["tokens_out"],
        "engine_startup_s": session["engine_startup_s"],
        "compile_cache": session.get("compile_cache"),
        "in_flight": session.get("in_flight"),
        "in_flight_reason": session.get("in_flight_reason"),
        # where a rollout's time goes (forge/engine/inprocess.py EngineLoad), and the prefix cache
        **{
            k: session.get(k)
            for k in (
                "max_active",
                "engine_requests_mean",
                "engine_below_full_batch_s",
                "engine_window_s",
                "prompt_build_s",
                "loop_cpu_s",
                "loop_busy",
                "prefix_cache_hit_rate",
                "first_request_after_ready_s",
            )
        },  # fmt: skip
        "overrides": overrides,
        "total_incl_startup_s": time.perf_counter() - t0,
    }


def gpu_memory_used_mib() -> list[int]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        return [int(x) for x in out.split()]
    except (OSError, ValueError, subprocess.SubprocessError):
        return []


def wait_gpu_free(limit_s: float = 60.0, free_below_mib: int = 2048) -> float:
    """Wait until the previous phase's engine has let go of the GPU memory; returns the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        used = gpu_memory_used_mib()
        if not used or max(used) < free_below_mib:
            break
        time.sleep(0.5)
    return time.perf_counter() - t0


class Phase:
    """One phase's process: started (perhaps early, waiting), then let go, then waited for."""

    def __init__(self, name: str, base: list[str], work: Path, early: bool) -> None:
        self.name = name
        self.result_path = work / f"result_{name.replace(':', '_')}.json"
        self.go_file = work / f"go_{name.replace(':', '_')}" if early else None
        argv = [sys.executable, __file__, *base, "--phase-only", name, "--result", str(self.result_path)]
        if self.go_file:
            argv += ["--go-file", str(self.go_file)]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv)

    def go(self) -> None:
        if self.go_file:
            self.go_file.touch()

    def wait(self) -> dict:
        rc = self.proc.wait()
        if rc != 0 or not self.result_path.exists():
            return {"error": f"phase {self.name} exited {rc}"}
        return json.loads(self.result_path.read_text())


def score_rows(args: argparse.Namespace, work: Path) -> Path:
    """--score-rows chats of ~1,000 tokens (a 300-word question, a 680-word answer), as JSONL."""
    path = work / "score_rows.jsonl"
    if not path.exists():
        tokenizer = os.path.join(args.model, "tokenizer.json")
        questions = make_texts(tokenizer, args.score_rows, 300, seed=1)
        answers = make_texts(tokenizer, args.score_rows, 680, seed=2)
        rows = [
            {"id": f"s{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for i, (q, a) in enumerate(zip(questions, answers, strict=True))
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def encoded_rows(args: argparse.Namespace, rows: Path) -> list:
    """(tokens, mask) of each row, exactly as forge's score stage computes them."""
    sys.path.insert(0, str(REPO))
    from forge.stages.tokenize.config import TokenizeConfig
    from forge.stages.tokenize.encode import Encoder

    enc = Encoder(args.model, TokenizeConfig(eos=False))
    chats = [json.loads(line)["messages"] for line in rows.read_text().splitlines()]
    return [(e.tokens, e.mask) for e in enc.chats(chats)]


def phase_score(args: argparse.Namespace, work: Path) -> dict:
    """forge pipeline=score score.kind=nll on vLLM (in process), tokens/s from engine-ready."""
    rows = score_rows(args, work)
    out = work / "score_out"
    shutil.rmtree(out, ignore_errors=True)  # a finished run dir would only be resumed: nothing measured
    cmd = [sys.executable, "-m", "forge.cli", "pipeline=score", "score.kind=nll", f"dataset.name={rows}",
           "model=qwen3_1.7b_dummy", f"model.name_or_path={args.model}", "run.progress=false",
           f"output.dir={out}", "output.examples_per_chunk=1000", *shlex.split(args.forge_overrides)]  # fmt: skip
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    s = json.loads((out / "stats.json").read_text())["score"]
    return {
        "rows": args.score_rows,
        "model_tok_s": s["model_tokens_per_s"],
        "scored_tok_s": s["scored_tokens_per_s"],
        "model_tokens": s["model_tokens"],
        "scored_tokens": s["scored_tokens"],
        "seconds_from_engine_ready": s["seconds_from_engine_ready"],
        "wall_s": time.time() - t0,
    }


def hf_pass(model, encoded: list, budget: int) -> dict:
    """One pass of the transformers loop over `encoded` in batches of at most `budget` tokens."""
    import torch

    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    batches, cur = [], []
    for i in order:
        if cur and len(encoded[i][0]) * (len(cur) + 1) > budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    batches.append(cur)
    torch.cuda.synchronize()
    t0, model_tokens, scored = time.time(), 0, 0
    for batch in batches:
        longest = max(len(encoded[i][0]) for i in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, i in enumerate(batch):
            toks = encoded[i][0]
            ids[r, : len(toks)] = torch.from_numpy(toks.astype("int64"))
            attn[r, : len(toks)] = 1
        ids, attn = ids.cuda(), attn.cuda()
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=attn).logits
            logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
            _ = (logp * attn[:, 1:]).sum(1).tolist()  # per-row sums reach the host, as a scorer needs
        model_tokens += int(attn.sum())
        scored += sum(int(encoded[i][1][1:].sum()) for i in batch)
    torch.cuda.synchronize()
    dt = time.time() - t0
    return {"batch_tokens": budget, "rows": len(encoded), "seconds": dt, "model_tok_s": model_tokens / dt,
            "scored_tok_s": scored / dt}  # fmt: skip


def phase_score_hf(args: argparse.Namespace, work: Path) -> dict:
    """A plain transformers bf16 loop (sdpa attention, random weights of the same shapes): rows
    sorted by length, batches of at most B tokens, log_softmax + gather. B is the best of
    --score-hf-batch-tokens on the first 300 rows; then the first --score-hf-rows rows at B."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    encoded = encoded_rows(args, score_rows(args, work))
    config = AutoConfig.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda().eval()
    hf_pass(model, encoded[:32], 8192)  # warm-up
    sweep = []
    for budget in map(int, args.score_hf_batch_tokens.split(",")):
        r = hf_pass(model, encoded[:300], budget)
        print(json.dumps(r), flush=True)
        sweep.append(r)
        torch.cuda.empty_cache()
    best = max(sweep, key=lambda r: r["model_tok_s"])
    result = hf_pass(model, encoded[: args.score_hf_rows], best["batch_tokens"])
    result["sweep"] = sweep
    return result


def phase_prefill(args: argparse.Namespace, work: Path) -> dict:
    """The bound: vLLM offline prefill of the same token sequences (max_tokens=1, no log-probabilities)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    encoded = encoded_rows(args, score_rows(args, work))
    llm = LLM(model=args.model, load_format="dummy", dtype="bfloat16", gpu_memory_utilization=0.9,
              max_model_len=4096, enable_prefix_caching=False)  # fmt: skip
    prompts = [TokensPrompt(prompt_token_ids=t.astype("int64").tolist()) for t, _ in encoded]
    t0 = time.time()
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    dt = time.time() - t0
    tokens = sum(len(t) for t, _ in encoded)
    return {"rows": len(encoded), "prefill_tok_s": tokens / dt, "tokens": tokens, "seconds": dt}


def run_one_phase(args: argparse.Namespace, work: Path, data: Path) -> None:
    name = kind_of(args.phase_only)
    try:
        if name == "score":
            result = phase_score(args, work)
        elif name == "score_hf":
            result = phase_score_hf(args, work)
        elif name == "prefill":
            result = phase_prefill(args, work)
        elif name == "offline":
            texts = [json.loads(line)["prompt"] for line in data.read_text().splitlines()]
            result = phase_offline(args, texts)
        elif name == "async":
            texts = [json.loads(line)["prompt"] for line in data.read_text().splitlines()]
            result = phase_async(args, texts)
        elif name in ("offline3", "offline3chain"):
            texts = [json.loads(line)["prompt"] for line in data.read_text().splitlines()]
            result = phase_offline3(args, texts, chain=name == "offline3chain")
        elif name == "datatrove":
            result = phase_datatrove(args, data, work)
        else:
            result = phase_forge(args, data, work, args.phase_only)
    except Exception as exc:  # recorded, and the next phase still runs
        import traceback

        traceback.print_exc()
        result = {"error": f"{exc.__class__.__name__}: {str(exc)[-2000:]}"}
    record_and_exit(args.result, result)


def record_and_exit(path: str, result: dict) -> None:
    """A phase process's end: its result for the parent, then out at once."""
    Path(path).write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # vLLM's background threads must not hold the process


def device_info() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        names = out.splitlines()
        return f"{len(names)} x {names[0]}" if len(names) > 1 else (names[0] if names else "unknown")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def add_score_ratios(ph: dict) -> None:
    """forge's NLL stage against the transformers loop (target >= 5x) and vLLM's prefill (>= 0.8x)."""
    s = ph.get("score", {})
    if s.get("model_tok_s"):
        if ph.get("score_hf", {}).get("model_tok_s"):
            s["vs_score_hf"] = s["model_tok_s"] / ph["score_hf"]["model_tok_s"]
        if ph.get("prefill", {}).get("prefill_tok_s"):
            s["vs_prefill"] = s["model_tok_s"] / ph["prefill"]["prefill_tok_s"]


def add_ratios(ph: dict) -> None:
    """Ratios against the reference phases of the same round: `forge#2` against `offline#2` when
    the call ran it (repeated phases, `--phases offline,forge,offline#2,forge#2`), else `offline`."""
    add_score_ratios(ph)

    def ref(kind: str, name: str, key: str = "output_tok_s") -> float | None:
        round_ = name.partition("#")[2]
        r = ph.get(f"{kind}#{round_}" if round_ and f"{kind}#{round_}" in ph else kind, {})
        return r.get(key)

    for name, r in ph.items():
        kind = kind_of(name)
        if kind == "async" and ref("offline", name):  # AsyncLLM's own share of forge's gap
            r["vs_offline"] = r["output_tok_s"] / ref("offline", name)
        if kind in OWN_PHASES or not r.get("output_tok_s"):
            continue
        off, dt, base = ref("offline", name), ref("datatrove", name), ref("forge", name)
        dt2 = ref("datatrove", name, "output_tok_s_from_dt_ready")
        if off:
            r["vs_offline"] = r["output_tok_s"] / off
        if dt:
            r["vs_datatrove"] = r["output_tok_s"] / dt
        if dt2:
            r["vs_datatrove_from_dt_ready"] = r["output_tok_s"] / dt2
        if base and kind != "forge":
            r["vs_forge"] = r["output_tok_s"] / base
        # a variant named rollout3chain_* (e.g. rollout.later_steps_first=false) has the same reference
        reference = ref("offline3chain", name) if "3chain" in kind else ref("offline3", name)
        if reference and kind.startswith("rollout3"):
            r["vs_offline3"] = r["output_tok_s"] / reference  # the same three steps as waves


def print_tables(results: dict) -> None:
    """The figures per phase, then where each engine phase's time went, then the score phases."""
    head = f"{'vs offline':>12}{'vs datatrove':>14}{'vs forge':>10}{'vs offline3':>13}{'phase s':>9}"
    print(f"\n{'path':<14}{'output tok/s':>14}{head}")
    nan = float("nan")
    for name, r in results["phases"].items():
        print(
            f"{name:<14}{r.get('output_tok_s') or nan:>14,.0f}{r.get('vs_offline', nan):>12.3f}"
            f"{r.get('vs_datatrove', nan):>14.3f}{r.get('vs_forge', nan):>10.3f}{r.get('vs_offline3', nan):>13.3f}"
            f"{r.get('phase_s', nan):>9.0f}"
        )
    print(f"\n{'where the time went':<20}{'engine reqs':>12}{'below full s':>13}{'loop busy':>10}"
          f"{'prefix hit':>11}{'ready->1st s':>13}")  # fmt: skip
    for name, r in results["phases"].items():
        if "loop_busy" in r or "main_thread_busy" in r:
            print(
                f"{name:<20}{r.get('engine_requests_mean') or nan:>12.1f}"
                f"{r.get('engine_below_full_batch_s') or nan:>13.1f}"
                f"{r.get('loop_busy') or r.get('main_thread_busy') or nan:>10.3f}"
                f"{r.get('prefix_cache_hit_rate') or nan:>11.3f}{r.get('first_request_after_ready_s') or nan:>13.2f}"
            )
    for name in SCORE_PHASES:
        r = results["phases"].get(name)
        if r:
            tok_s = r.get("model_tok_s") or r.get("prefill_tok_s") or nan
            scored = r.get("scored_tok_s") or nan
            ratios = f"vs transformers {r.get('vs_score_hf', nan):.2f}x  vs prefill {r.get('vs_prefill', nan):.3f}x"
            print(f"{name:<14}{tok_s:>14,.0f} model tok/s {scored:>12,.0f} scored tok/s  {ratios}")
    print(
        f"all phases: {results['elapsed_s']:.0f} s; targets (issue 25): forge and forge:vllm >= 1.00 x offline, "
        "rollout3 and rollout3chain >= 1.05 x offline3 / offline3chain; score >= 0.9 x prefill"
    )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("out_json")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--words", type=int, default=150)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--offline-max-num-seqs", type=int, default=512)
    ap.add_argument("--phases", default="offline,datatrove,forge")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="a forge phase NAME with extra space-separated Hydra overrides, e.g. 'tp2=model.tp=2'",
    )
    ap.add_argument("--forge-overrides", default="", help="extra Hydra overrides for every forge phase")
    ap.add_argument(
        "--compile-cache",
        default=str(default_compile_cache()),
        help="VLLM_CACHE_ROOT for every phase (default: forge's own default, $FORGE_CACHE/vllm)",
    )
    ap.add_argument("--no-early-start", action="store_true", help="start each phase's process only when its turn comes")
    ap.add_argument("--work", default=None)
    ap.add_argument("--score-rows", type=int, default=20_000, help="score phases: chats of ~1,000 tokens")
    ap.add_argument("--score-hf-rows", type=int, default=2_000, help="score_hf: the first rows only (it is slow)")
    ap.add_argument("--score-hf-batch-tokens", default="8192,16384,32768", help="score_hf: batch sizes tried")
    ap.add_argument(
        "--write-prompts",
        default=None,
        metavar="JSONL",
        help="only write the workload's prompts ({id, prompt} lines) to JSONL and exit (for `forge +sweep=...`)",
    )
    ap.add_argument("--phase-only", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--go-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--variants-json", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.variants = json.loads(args.variants_json)
    for spec in args.variant:
        name, sep, overrides = spec.partition("=")
        if not sep or not name or name in OWN_PHASES or name.startswith("forge"):
            ap.error(f"--variant {spec!r}: expected NAME=OVERRIDES with a NAME other than offline/datatrove/forge*")
        args.variants[name] = overrides
    known = (*OWN_PHASES, *SCORE_PHASES, "forge", "rollout3", "rollout3chain", "rollout3full", *args.variants)
    for phase in filter(None, args.phases.split(",")):
        if kind_of(phase) not in known and not phase.startswith("forge:"):
            ap.error(
                f"unknown phase {phase!r}: offline, async, offline3, offline3chain, datatrove, forge, rollout3, "
                "rollout3chain, rollout3full, "
                "forge:ENGINE or a --variant NAME"
            )
    return args


def main() -> None:
    args = parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="forge-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.compile_cache)
    os.environ["VLLM_CACHE_ROOT"] = str(cache)  # offline, and datatrove's `vllm serve`, inherit it
    data = work / "prompts.jsonl"
    if args.phase_only:
        run_one_phase(args, work, data)
    texts = make_texts(os.path.join(args.model, "tokenizer.json"), args.n, args.words)
    if args.write_prompts:
        data = Path(args.write_prompts)
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    if args.write_prompts:
        print(f"{len(texts)} prompts in {data}")
        return
    from importlib.metadata import version

    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "vllm": version("vllm"),
        "device": device_info(),
        "n": args.n,
        "max_tokens": args.max_tokens,
        "compile_cache": str(cache),
        "compile_cache_entries_at_start": len(compile_entries(cache)),
        "variants": args.variants,
        "forge_overrides": args.forge_overrides,
        "phases": {},
    }
    base = [
        args.model,
        args.out_json,
        "--n",
        str(args.n),
        "--words",
        str(args.words),
        "--max-tokens",
        str(args.max_tokens),
        "--offline-max-num-seqs",
        str(args.offline_max_num_seqs),
        "--compile-cache",
        str(cache),
        "--work",
        str(work),
        f"--forge-overrides={args.forge_overrides}",
        f"--variants-json={json.dumps(args.variants)}",
        f"--score-rows={args.score_rows}",
        f"--score-hf-rows={args.score_hf_rows}",
        f"--score-hf-batch-tokens={args.score_hf_batch_tokens}",
    ]
    phases = [p for p in args.phases.split(",") if p]
    t_all = time.perf_counter()
    pending: Phase | None = None
    for i, name in enumerate(phases):
        waited = wait_gpu_free()
        before = compile_entries(cache)
        current = pending if pending and pending.name == name else Phase(name, base, work, early=False)
        current.go()
        t0 = time.perf_counter()
        print(f"[{time.perf_counter() - t_all:6.1f} s] phase {name} goes (GPU free after {waited:.1f} s)", flush=True)
        nxt = phases[i + 1] if i + 1 < len(phases) else None
        early = nxt is not None and kind_of(nxt) in OWN_PHASES and not args.no_early_start
        pending = Phase(nxt, base, work, early=True) if early else None
        result = current.wait()
        result["phase_s"] = time.perf_counter() - t0
        result["gpu_free_wait_s"] = waited
        result["new_compile_cache_entries"] = sorted(compile_entries(cache) - before)
        results["phases"][name] = result
        results["elapsed_s"] = time.perf_counter() - t_all
        add_ratios(results["phases"])
        Path(args.out_json).write_text(json.dumps(results, indent=1))
        print(f"[{time.perf_counter() - t_all:6.1f} s] PHASE {name}: {json.dumps(result)}", flush=True)
    print(json.dumps(results, indent=1))
    print_tables(results)


if __name__ == "__main__":
    main()
