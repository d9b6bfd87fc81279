"""forge's generation step vs datatrove 0.10.1's InferenceRunner, same zero-latency server.

Both get the same documents, the same in-flight limit, checkpointed output and a request
cache; the server answers at once, so docs/s measures orchestration overhead alone. Also
prints a bare keep-alive aiohttp client as the ceiling on this machine, and the same for a
3-step rollout (draft -> critique -> revise: forge's rollout=critique_revise vs a datatrove
rollout function making the same three dependent calls), in requests/s.

Phase `cli` (issue 25) times whole commands, start to exit, against a server whose answers are
100 words (100 completion tokens by its usage counts): the `forge` command (compose, scan, plan,
generation, writes, stats, card) and a Python process running datatrove's InferenceRunner on the
same documents (imports, reading, inference, writes), one after the other.

    python benchmarks/orchestration.py [--docs 20000] [--in-flight 256] [--phases single,rollout3,cli]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
ANSWER_WORDS = 100  # phase cli: each answer is 100 words, 100 completion tokens
sys.path.insert(0, str(HERE.parent))


def start_server(words: int = 3) -> tuple[subprocess.Popen, str]:
    from forge.engine.server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "canned_server.py"), str(port), "--words", str(words)])
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("canned server did not start")


def served(url: str) -> int:
    with urllib.request.urlopen(f"{url}/stats") as resp:
        return json.load(resp)["requests"]


async def bare_client(url: str, n: int, in_flight: int) -> float:
    body = json.dumps({"model": "canned", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16})
    conn = aiohttp.TCPConnector(limit=in_flight)
    async with aiohttp.ClientSession(connector=conn) as session:
        todo = iter(range(n))

        async def worker() -> None:
            for _ in todo:
                async with session.post(
                    f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
                ) as resp:
                    await resp.read()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return n / (time.perf_counter() - t0)


def run_forge(url: str, data: Path, out: Path, in_flight: int, chunk: int, tokenizer: str, steps: int = 1) -> float:
    """forge on the canned server; steps=3 runs rollout=critique_revise (its conf file's prompts)."""
    import yaml

    from forge.config import DatasetConfig, ForgeConfig, OutputConfig, RunConfig
    from forge.engine.config import EngineKind, ModelConfig
    from forge.io.dataset import Source
    from forge.stages.generate.config import GenerationConfig
    from forge.stages.generate.rollout.config import RolloutConfig
    from forge.stages.generate.run import _run_async, manifest, run_task

    cfg = ForgeConfig(
        dataset=DatasetConfig(name=str(data), id_column="id"),
        generation=GenerationConfig(max_tokens=16),
        model=ModelConfig(
            name_or_path="canned", engine=EngineKind.endpoint, endpoint_url=url, tokenizer=tokenizer, max_model_len=4096
        ),
        output=OutputConfig(dir=str(out), examples_per_chunk=chunk),
        run=RunConfig(max_in_flight=in_flight, progress=False, log_every_s=3600),
    )
    if steps == 3:
        conf = yaml.safe_load((HERE.parent / "conf" / "rollout" / "critique_revise.yaml").read_text())
        cfg.rollout = RolloutConfig(fn=conf["fn"], prompts=conf["prompts"], rounds=1)
    out.mkdir(parents=True)
    source = Source(cfg.dataset, all_columns=steps > 1)
    t0 = time.perf_counter()
    _run_async(run_task(cfg, 0, source, None, "canned", manifest(cfg, source)))
    return time.perf_counter() - t0


def run_forge_cli(url: str, data: Path, out: Path, in_flight: int, chunk: int, tokenizer: str) -> float:
    """The `forge` command itself, from its start to its exit."""
    script = Path(sys.executable).with_name("forge")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "forge.cli"]
    cmd += [
        "model=endpoint",
        f"model.endpoint_url={url}",
        "model.name_or_path=canned",
        f"model.tokenizer={tokenizer}",
        f"dataset.name={data}",
        "dataset.id_column=id",
        f"output.dir={out}",
        f"output.examples_per_chunk={chunk}",
        f"run.max_in_flight={in_flight}",
        f"generation.max_tokens={ANSWER_WORDS}",
        "run.progress=false",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run_datatrove_cli(url: str, data: Path, out: Path, in_flight: int, chunk: int) -> float:
    """datatrove's InferenceRunner in a fresh Python process (this script, --datatrove-only), start to exit."""
    cmd = [sys.executable, __file__, "--datatrove-only", url, str(data), str(out), str(in_flight), str(chunk)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run_datatrove(
    url: str, data: Path, out: Path, in_flight: int, chunk: int, steps: int = 1, max_tokens: int = 16
) -> float:
    from datatrove.pipeline.inference.run_inference import InferenceConfig, InferenceRunner
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import ParquetWriter

    async def rollout(doc, generate):
        messages = [{"role": "user", "content": doc.text}]
        result = await generate({"messages": messages, "max_tokens": max_tokens})
        if steps == 1:
            return result.text
        critique = await generate(
            {"messages": [{"role": "user", "content": f"Critique: {doc.text}\n{result.text}"}], "max_tokens": 16}
        )
        turns = [*messages, {"role": "assistant", "content": result.text}, {"role": "user", "content": critique.text}]
        revised = await generate({"messages": turns, "max_tokens": 16})
        return revised.text

    runner = InferenceRunner(
        rollout_fn=rollout,
        config=InferenceConfig(
            server_type="endpoint",
            model_name_or_path="canned",
            endpoint_url=url,
            max_concurrent_generations=in_flight,
            metric_interval=3600,
        ),
        output_writer=ParquetWriter(str(out / "data"), output_filename="${rank}_chunk_${chunk_index}.parquet"),
        checkpoints_local_dir=str(out / "checkpoints"),
        records_per_chunk=chunk,
    )
    docs = list(JsonlReader(str(data.parent), glob_pattern=data.name, text_key="prompt", id_key="id")())
    t0 = time.perf_counter()
    runner.run(iter(docs), rank=0, world_size=1)
    return time.perf_counter() - t0


def datatrove_only(argv: list[str]) -> None:
    """The datatrove side of phase cli, run as its own process."""
    from loguru import logger

    logger.remove()
    logger.disable("datatrove")
    url, data, out, in_flight, chunk = argv
    run_datatrove(url, Path(data), Path(out), int(in_flight), int(chunk), max_tokens=ANSWER_WORDS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--in-flight", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument(
        "--phases",
        default="single,rollout3,cli",
        help="single (one request per doc), rollout3 (3 steps), cli (whole commands, 100-token answers)",
    )
    args = ap.parse_args()
    phases = args.phases.split(",")
    from forge.engine.tiny_model import ensure_tiny_model

    tokenizer = str(ensure_tiny_model())
    import logging

    logging.getLogger("forge").setLevel(logging.WARNING)
    from loguru import logger

    logger.remove()  # datatrove logs every chunk; keep the output readable
    logger.disable("datatrove")  # its runner adds its own handler again
    work = Path(tempfile.mkdtemp(prefix="forge-bench-"))
    data = work / "docs.jsonl"
    with open(data, "w") as fh:
        for i in range(args.docs):
            fh.write(json.dumps({"id": f"doc-{i}", "prompt": f"Write a short note about item number {i}."}) + "\n")
    server, url = start_server()
    results: dict[str, float] = {}
    try:
        results["bare_aiohttp_req_s"] = asyncio.run(bare_client(url, args.docs, args.in_flight))
        if "cli" in phases:
            cli_server, cli_url = start_server(ANSWER_WORDS)
            try:
                for side, fn in (("forge", run_forge_cli), ("datatrove", run_datatrove_cli)):
                    extra = (tokenizer,) if side == "forge" else ()
                    before = served(cli_url)
                    secs = fn(cli_url, data, work / f"{side}-cli", args.in_flight, args.chunk, *extra)
                    results[f"cli_{side}_docs_s"] = args.docs / secs
                    results[f"cli_{side}_requests_s"] = (served(cli_url) - before) / secs
                results["cli_forge_vs_datatrove"] = results["cli_forge_docs_s"] / results["cli_datatrove_docs_s"]
            finally:
                cli_server.terminate()
                cli_server.wait()
        for phase in (p for p in phases if p != "cli"):
            steps = 3 if phase == "rollout3" else 1
            tag = "" if steps == 1 else "rollout3_"
            for side, fn in (("forge", run_forge), ("datatrove", run_datatrove)):
                before = served(url)
                extra = (tokenizer,) if side == "forge" else ()
                secs = fn(url, data, work / f"{side}{steps}", args.in_flight, args.chunk, *extra, steps=steps)
                results[f"{tag}{side}_docs_s"] = args.docs / secs
                results[f"{tag}{side}_requests"] = served(url) - before
                results[f"{tag}{side}_requests_s"] = results[f"{tag}{side}_requests"] / secs
            results[f"{tag}forge_vs_datatrove"] = results[f"{tag}forge_docs_s"] / results[f"{tag}datatrove_docs_s"]
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    results.update(docs=args.docs, in_flight=args.in_flight, cpus=os.cpu_count())
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}, indent=2))
    print(f"\n{'client':<22}{'docs/s':>10}{'requests/s':>12}")
    print(f"{'bare aiohttp':<22}{'':>10}{results['bare_aiohttp_req_s']:>12,.0f}")
    for tag, what in (("", "single step"), ("rollout3_", "3-step rollout"), ("cli_", "CLI, 100 tok")):
        if f"{tag}forge_docs_s" not in results:
            continue
        for side in ("forge", "datatrove"):
            docs, reqs = results[f"{tag}{side}_docs_s"], results[f"{tag}{side}_requests_s"]
            print(f"{side + ' ' + what:<22}{docs:>10,.0f}{reqs:>12,.0f}")
        print(f"  forge / datatrove = {results[f'{tag}forge_vs_datatrove']:.2f}x")
    print("targets: single step forge >= 1,500 docs/s and >= 5x datatrove; 3-step rollout forge >= 1,500 requests/s;")
    print("         CLI (start to exit, 100-token answers) forge >= 3,000 docs/s and >= 10x datatrove")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--datatrove-only"]:
        datatrove_only(sys.argv[2:])
    else:
        main()
