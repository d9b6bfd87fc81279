"""Command lines for the engines forge starts. Pure functions, so each flag is unit-tested."""

from __future__ import annotations

import json
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

from forge.engine.capacity import DEFAULT_VLLM_MAX_NUM_SEQS
from forge.engine.config import EngineKind, ModelConfig

TESTED_VLLM = "0.26.0"  # the vLLM release forge is validated with on the GPU (benchmarks/RESULTS.md)


def engine_executable(name: str) -> str:
    """An engine's console script (`vllm`, `transformers`) from forge's own environment first:
    the folder of sys.executable (a venv's bin/, where the venv's python is a symlink: not
    resolved), then the interpreter's scripts dir, then PATH. So `.venv/bin/forge` run from cron,
    a Slurm script or pipx, with the venv not activated, starts the engine installed beside it.
    The bare name when none is found: running it then fails with FileNotFoundError naming it."""
    folders = [str(Path(sys.executable).parent)] if sys.executable else []
    scripts = sysconfig.get_path("scripts")
    if scripts and scripts not in folders:
        folders.append(scripts)
    for folder in folders:
        found = shutil.which(name, path=folder)
        if found:
            return found
    return shutil.which(name) or name


_VLLM_HINT = (
    f"install the version forge is tested with: pip install 'forge[vllm]' (vllm=={TESTED_VLLM}), needs a CUDA GPU"
)
_MISSING = {  # engine kind -> (what is missing, how to install it)
    "vllm": ("vLLM", _VLLM_HINT),
    "vllm_async": ("vLLM", _VLLM_HINT),
    "sglang": ("SGLang", "pip install 'forge[sglang]' (forge's SGLang path is unit-tested only)"),
    "transformers": ("transformers", "it is one of forge's own dependencies: `pip install -e .` reinstalls it"),
}


def missing_engine_message(kind: EngineKind, exe: str | None) -> str:
    """One line for an engine that is not installed where forge runs: what is missing, in which
    environment (its python: pip must be that python's), and what installs it. `exe` is what could
    not be run (FileNotFoundError.filename), or for vllm_async the module that could not be imported."""
    what, how = _MISSING.get(kind.value, (kind.value, "install it"))
    verb = "import" if kind == EngineKind.vllm_async else "run"
    name = exe or {"vllm_async": "vllm"}.get(kind.value, kind.value)
    return (
        f"model.engine={kind.value}: cannot {verb} {name!r}: {what} is not installed in this environment "
        f"({sys.executable or 'python'}); {how}"
    )


def engine_version(kind: EngineKind) -> str | None:
    """`vllm 0.26.0`-style version of the engine package forge runs (None for an endpoint)."""
    from importlib.metadata import PackageNotFoundError, version

    package = {"vllm": "vllm", "vllm_async": "vllm", "sglang": "sglang", "transformers": "transformers"}.get(kind.value)
    if package is None:
        return None
    try:
        return f"{package} {version(package)}"
    except PackageNotFoundError:
        return None


def _flag(name: str) -> str:
    return "--" + name.lstrip("-").replace("_", "-")


def extra_args(engine_args: dict[str, Any]) -> list[str]:
    """`{flag: value}` -> CLI args: True -> bare flag, False/None -> omitted, dict/list -> JSON."""
    args: list[str] = []
    for key, value in engine_args.items():
        if value is None or value is False:
            continue
        if value is True:
            args.append(_flag(key))
        elif isinstance(value, (dict, list)):
            args += [_flag(key), json.dumps(value, sort_keys=True)]
        else:
            args += [_flag(key), str(value)]
    return args


def _opt(args: list[str], flag: str, value: Any) -> None:
    if value is not None:
        args += [flag, json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)]


def vllm_command(m: ModelConfig, model_path: str, port: int, seed: int | None = None) -> list[str]:
    """`vllm serve` with every conf/model knob that vLLM understands."""
    args = [engine_executable("vllm"), "serve", model_path, "--host", "127.0.0.1", "--port", str(port)]
    args += ["--served-model-name", m.served_name or m.name_or_path]
    args += ["--tensor-parallel-size", str(m.tp), "--pipeline-parallel-size", str(m.pp)]
    args += ["--data-parallel-size", str(m.dp)]
    _opt(args, "--revision", m.revision)
    _opt(args, "--max-model-len", m.max_model_len)
    _opt(args, "--gpu-memory-utilization", m.gpu_memory_utilization)
    _opt(args, "--max-num-seqs", m.max_num_seqs or DEFAULT_VLLM_MAX_NUM_SEQS)
    _opt(args, "--max-num-batched-tokens", m.max_num_batched_tokens)
    _opt(args, "--speculative-config", m.speculative)
    _opt(args, "--kv-cache-dtype", m.kv_cache_dtype)
    _opt(args, "--quantization", m.quantization)
    _opt(args, "--load-format", m.load_format)
    _opt(args, "--seed", seed)
    if m.trust_remote_code:
        args.append("--trust-remote-code")
    return args + extra_args(m.engine_args)


def sglang_command(m: ModelConfig, model_path: str, port: int, seed: int | None = None) -> list[str]:
    """`python -m sglang.launch_server`; speculative keys map to --speculative-<key>."""
    args = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path]
    args += ["--host", "127.0.0.1", "--port", str(port)]
    args += ["--served-model-name", m.served_name or m.name_or_path]
    args += ["--tp-size", str(m.tp), "--pp-size", str(m.pp), "--dp-size", str(m.dp)]
    _opt(args, "--revision", m.revision)
    _opt(args, "--context-length", m.max_model_len)
    _opt(args, "--mem-fraction-static", m.gpu_memory_utilization)
    _opt(args, "--max-running-requests", m.max_num_seqs)
    _opt(args, "--chunked-prefill-size", m.max_num_batched_tokens)
    _opt(args, "--kv-cache-dtype", m.kv_cache_dtype)
    _opt(args, "--quantization", m.quantization)
    _opt(args, "--load-format", m.load_format)
    _opt(args, "--random-seed", seed)
    for key, value in (m.speculative or {}).items():
        name = key if key.startswith("speculative") else f"speculative_{key}"
        _opt(args, _flag(name), value)
    if m.trust_remote_code:
        args.append("--trust-remote-code")
    return args + extra_args(m.engine_args)


def transformers_command(m: ModelConfig, model_path: str, port: int, seed: int | None = None) -> list[str]:
    """`transformers serve` on CPU with continuous batching (one request at a time otherwise)."""
    args = [engine_executable("transformers"), "serve", model_path, "--device", "cpu"]
    args += ["--host", "127.0.0.1", "--port", str(port)]
    args.append("--continuous-batching")
    _opt(args, "--default-seed", seed)
    if m.trust_remote_code:
        args.append("--trust-remote-code")
    return args + extra_args(m.engine_args)


BUILDERS = {
    EngineKind.vllm: vllm_command,
    EngineKind.sglang: sglang_command,
    EngineKind.transformers: transformers_command,
}


def build_command(m: ModelConfig, model_path: str, port: int, seed: int | None = None) -> list[str]:
    """The server command for `m.engine`; endpoint engines have none."""
    if m.engine not in BUILDERS:
        raise ValueError(f"model.engine={m.engine.value} is not started by forge")
    return BUILDERS[m.engine](m, model_path, port, seed)
