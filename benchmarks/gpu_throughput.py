"""Output tokens/s on one GPU: raw vLLM offline vs datatrove 0.10.1's InferenceRunner vs forge.

Runs on the device (see benchmarks/RESULTS.md for the exact call). The kit's workload: N chat
prompts of W random single-token words (~160 prompt tokens with the template), max_tokens 1024,
ignore_eos, temperature 0.8, top_p 1, top_k 0, dummy weights. Each phase runs in its own process
(the GPU is free between them) and shares one compile cache, so only the first compiles cold.
Throughput is counted from engine-ready to the last answer for datatrove and forge, and over
`LLM.generate` for offline. Prints one JSON and a table; writes the JSON after every phase.

    python benchmarks/gpu_throughput.py MODEL_DIR OUT_JSON [--phases offline,forge,datatrove]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLING = {"temperature": 0.8, "top_p": 1.0, "top_k": 0}


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


def phase_offline(args: argparse.Namespace, texts: list[str]) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        load_format="dummy",
        dtype="bfloat16",
        gpu_memory_utilization=0.9,
        max_model_len=4096,
        seed=0,
        max_num_seqs=args.offline_max_num_seqs,
    )
    prompts = [[{"role": "user", "content": t}] for t in texts]
    llm.chat(prompts[:8], SamplingParams(max_tokens=16, ignore_eos=True, **SAMPLING), use_tqdm=False)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, **SAMPLING)
    t0 = time.perf_counter()
    outs = llm.chat(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    out_tok = sum(len(c.token_ids) for o in outs for c in o.outputs)
    in_tok = sum(len(o.prompt_token_ids) for o in outs)
    return {
        "output_tok_s": out_tok / wall,
        "input_tok_s": in_tok / wall,
        "wall_s": wall,
        "output_tokens": out_tok,
        "max_num_seqs": args.offline_max_num_seqs,
    }


def phase_datatrove(args: argparse.Namespace, data: Path, work: Path) -> dict:
    from datatrove.pipeline.inference.run_inference import InferenceConfig, InferenceRunner
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import ParquetWriter
    from loguru import logger

    marks = {"ready": None, "last": None, "tokens": 0}

    def server_ready(message) -> None:  # datatrove forwards the server's output lines
        if marks["ready"] is None and "Application startup complete" in str(message):
            marks["ready"] = time.perf_counter()

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
    docs = list(JsonlReader(str(data.parent), glob_pattern=data.name, text_key="prompt", id_key="id")())
    t0 = time.perf_counter()
    runner.run(iter(docs), rank=0, world_size=1)
    window = marks["last"] - marks["ready"]  # its rollouts start before the server is ready
    return {
        "output_tok_s": marks["tokens"] / window,
        "wall_s": window,
        "output_tokens": marks["tokens"],
        "total_incl_startup_s": time.perf_counter() - t0,
        "max_concurrent_generations": 512,
    }


def phase_forge(args: argparse.Namespace, data: Path, work: Path, engine: str) -> dict:
    out = work / f"forge_{engine}"
    cmd = [
        sys.executable,
        "-m",
        "forge.cli",
        "model=qwen3_1.7b_dummy",
        f"model.engine={engine}",
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
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"forge failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    session = json.loads((out / "stats.json").read_text())["last_sessions"][0]
    return {
        "output_tok_s": session["output_tokens_per_s"],
        "wall_s": session["generation_s"],
        "output_tokens": session["tokens_out"],
        "engine_startup_s": session["engine_startup_s"],
        "compile_cache": session.get("compile_cache"),
        "in_flight": session.get("in_flight"),
        "in_flight_reason": session.get("in_flight_reason"),
        "total_incl_startup_s": time.perf_counter() - t0,
    }


def run_phase(name: str, argv: list[str]) -> dict:
    """Each phase in its own process, so the GPU is free for the next one."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        result_path = tmp.name
    proc = subprocess.run([sys.executable, __file__, *argv, "--phase-only", name, "--result", result_path])
    if proc.returncode != 0:
        return {"error": f"phase {name} exited {proc.returncode}"}
    return json.loads(Path(result_path).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("out_json")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--words", type=int, default=150)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--offline-max-num-seqs", type=int, default=512)
    ap.add_argument("--phases", default="offline,forge,datatrove")
    ap.add_argument("--work", default=None)
    ap.add_argument("--phase-only", default=None)
    ap.add_argument("--result", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="forge-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "prompts.jsonl"
    if not data.exists():
        texts = make_texts(os.path.join(args.model, "tokenizer.json"), args.n, args.words)
        data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    if args.phase_only:
        texts = [json.loads(line)["prompt"] for line in data.read_text().splitlines()]
        if args.phase_only == "offline":
            result = phase_offline(args, texts)
        elif args.phase_only == "datatrove":
            result = phase_datatrove(args, data, work)
        else:
            result = phase_forge(args, data, work, args.phase_only.split(":")[1])
        Path(args.result).write_text(json.dumps(result))
        os._exit(0)  # vLLM's background threads must not hold the process
    import vllm

    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "vllm": vllm.__version__,
        "n": args.n,
        "max_tokens": args.max_tokens,
        "phases": {},
    }
    try:
        import torch

        results["device"] = torch.cuda.get_device_name(0)
    except Exception:
        results["device"] = "unknown"
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
        "--work",
        str(work),
    ]
    for phase in args.phases.split(","):
        name = (
            phase
            if phase in ("offline", "datatrove")
            else f"forge:{phase.split(':')[-1] if ':' in phase else 'vllm_async'}"
        )
        t0 = time.perf_counter()
        results["phases"][name] = {**run_phase(name, base), "phase_s": time.perf_counter() - t0}
        Path(args.out_json).write_text(json.dumps(results, indent=1))
        print(f"PHASE {name}: {json.dumps(results['phases'][name])}", flush=True)
    ph = results["phases"]
    off = ph.get("offline", {}).get("output_tok_s")
    dt = ph.get("datatrove", {}).get("output_tok_s")
    for name, r in ph.items():
        if name.startswith("forge") and r.get("output_tok_s"):
            if off:
                r["vs_offline"] = r["output_tok_s"] / off
            if dt:
                r["vs_datatrove"] = r["output_tok_s"] / dt
    Path(args.out_json).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    print(f"\n{'path':<20}{'output tok/s':>14}{'vs offline':>12}{'vs datatrove':>14}")
    for name, r in ph.items():
        tps = r.get("output_tok_s")
        print(
            f"{name:<20}{tps or float('nan'):>14,.0f}{r.get('vs_offline', float('nan')):>12.3f}"
            f"{r.get('vs_datatrove', float('nan')):>14.3f}"
        )
    print("targets: forge >= 0.97 x offline, forge >= 1.10 x datatrove")


if __name__ == "__main__":
    main()
