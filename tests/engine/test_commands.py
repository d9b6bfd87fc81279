import json
import os
import re
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO

from forge.engine.commands import TESTED_VLLM, build_command, engine_executable, extra_args, missing_engine_message
from forge.engine.config import EngineKind, ModelConfig
from forge.engine.server import normalize_base_url


def _after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_vllm_command_carries_every_knob() -> None:
    m = ModelConfig(
        name_or_path="Qwen/Qwen3-4B",
        engine=EngineKind.vllm,
        revision="main",
        tp=2,
        pp=2,
        dp=2,
        max_model_len=8192,
        gpu_memory_utilization=0.85,
        max_num_seqs=512,
        max_num_batched_tokens=16384,
        speculative={"method": "ngram", "num_speculative_tokens": 4},
        kv_cache_dtype="fp8",
        quantization="fp8",
        load_format="dummy",
        engine_args={"enable_prefix_caching": True, "swap_space": 0},
    )
    args = build_command(m, "Qwen/Qwen3-4B", 8123, seed=7)
    assert Path(args[0]).name == "vllm" and args[1:3] == ["serve", "Qwen/Qwen3-4B"]
    assert args[0] == engine_executable("vllm")  # forge's own environment's vllm, else PATH's
    expected = {
        "--port": "8123",
        "--host": "127.0.0.1",
        "--served-model-name": "Qwen/Qwen3-4B",
        "--revision": "main",
        "--tensor-parallel-size": "2",
        "--pipeline-parallel-size": "2",
        "--data-parallel-size": "2",
        "--max-model-len": "8192",
        "--gpu-memory-utilization": "0.85",
        "--max-num-seqs": "512",
        "--max-num-batched-tokens": "16384",
        "--kv-cache-dtype": "fp8",
        "--quantization": "fp8",
        "--load-format": "dummy",
        "--seed": "7",
        "--swap-space": "0",
    }
    for flag, value in expected.items():
        assert _after(args, flag) == value, flag
    assert json.loads(_after(args, "--speculative-config")) == {"method": "ngram", "num_speculative_tokens": 4}
    assert "--enable-prefix-caching" in args
    assert "--trust-remote-code" not in args  # only when asked


def test_vllm_command_minimal_and_trust_remote_code() -> None:
    args = build_command(ModelConfig(name_or_path="m", engine=EngineKind.vllm, trust_remote_code=True), "m", 1)
    assert "--trust-remote-code" in args
    for absent in ("--max-model-len", "--speculative-config", "--quantization", "--seed"):
        assert absent not in args
    assert _after(args, "--max-num-seqs") == "512"  # forge's default, not vLLM's 1024


def test_sglang_command() -> None:
    m = ModelConfig(
        name_or_path="Qwen/Qwen3-4B",
        engine=EngineKind.sglang,
        tp=4,
        dp=2,
        max_model_len=4096,
        gpu_memory_utilization=0.8,
        max_num_seqs=256,
        speculative={"algorithm": "EAGLE", "num_steps": 3},
    )
    args = build_command(m, "Qwen/Qwen3-4B", 9000, seed=1)
    assert args[1:3] == ["-m", "sglang.launch_server"]
    for flag, value in {
        "--model-path": "Qwen/Qwen3-4B",
        "--port": "9000",
        "--tp-size": "4",
        "--dp-size": "2",
        "--pp-size": "1",
        "--context-length": "4096",
        "--mem-fraction-static": "0.8",
        "--max-running-requests": "256",
        "--speculative-algorithm": "EAGLE",
        "--speculative-num-steps": "3",
        "--random-seed": "1",
    }.items():
        assert _after(args, flag) == value, flag


def test_transformers_command_uses_continuous_batching() -> None:
    m = ModelConfig(engine_args={"cb-num-blocks": 128, "cb_max_batch_tokens": 512})
    args = build_command(m, "/models/tiny", 5000)
    assert Path(args[0]).name == "transformers" and os.path.isabs(args[0])  # a dependency of forge: found
    assert args[1:3] == ["serve", "/models/tiny"]
    assert "--continuous-batching" in args and _after(args, "--device") == "cpu"
    assert _after(args, "--cb-num-blocks") == "128" and _after(args, "--cb-max-batch-tokens") == "512"


def test_extra_args_and_base_url() -> None:
    assert extra_args({"a_b": True, "c": False, "d": None, "e": {"x": 1}, "f": 2}) == [
        "--a-b",
        "--e",
        '{"x": 1}',
        "--f",
        "2",
    ]
    for url in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/"):
        assert normalize_base_url(url) == "http://h:8000"


def _script(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_engine_executable_prefers_forges_own_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A venv's bin/python is a symlink to the base interpreter: its folder, not the target's, is
    the venv's bin/, where pip put the engine's console script. Then the scripts dir, then PATH."""
    venv_bin, scripts, on_path = tmp_path / "venv" / "bin", tmp_path / "scripts", tmp_path / "path"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(sys.executable)
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *a, **k: str(scripts) if name == "scripts" else None)
    monkeypatch.setenv("PATH", str(on_path))
    for folder in (venv_bin, scripts, on_path):
        _script(folder, "vllm")
    assert engine_executable("vllm") == str(venv_bin / "vllm")
    (venv_bin / "vllm").unlink()
    assert engine_executable("vllm") == str(scripts / "vllm")
    (scripts / "vllm").unlink()
    assert engine_executable("vllm") == str(on_path / "vllm")
    (on_path / "vllm").chmod(0o644)  # not executable: not an engine to run
    assert engine_executable("vllm") == "vllm"  # Popen then fails naming it (missing_engine_message)
    m = ModelConfig(name_or_path="m", engine=EngineKind.vllm)
    _script(venv_bin, "vllm")
    assert build_command(m, "m", 1)[0] == str(venv_bin / "vllm")
    _script(venv_bin, "transformers")
    assert build_command(ModelConfig(), "/models/tiny", 1)[0] == str(venv_bin / "transformers")


def test_missing_engine_message() -> None:
    vllm = missing_engine_message(EngineKind.vllm, "vllm")
    assert vllm == (
        f"model.engine=vllm: cannot run 'vllm': vLLM is not installed in this environment ({sys.executable}); "
        f"install the version forge is tested with: pip install 'forge[vllm]' (vllm=={TESTED_VLLM}), needs a CUDA GPU"
    )
    inproc = missing_engine_message(EngineKind.vllm_async, None)
    assert inproc.startswith("model.engine=vllm_async: cannot import 'vllm': vLLM is not installed")
    assert inproc.endswith(vllm.split("; ", 1)[1])
    sglang = missing_engine_message(EngineKind.sglang, sys.executable)
    assert "SGLang is not installed" in sglang and "pip install 'forge[sglang]'" in sglang
    assert "unit-tested only" in sglang
    cpu = missing_engine_message(EngineKind.transformers, "/somewhere/bin/transformers")
    assert cpu.startswith("model.engine=transformers: cannot run '/somewhere/bin/transformers': transformers is")
    assert "`pip install -e .` reinstalls it" in cpu
    for line in (vllm, inproc, sglang, cpu):
        assert "\n" not in line and f"({sys.executable})" in line


def test_vllm_extra_pins_the_tested_release() -> None:
    """pyproject's `forge[vllm]` installs the release the message names (and RESULTS.md measured)."""
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^vllm = \["vllm==([^"]+)"\]$', text, re.M).group(1) == TESTED_VLLM
    assert re.search(r'^sglang = \["sglang[^"]*"\]$', text, re.M)
    assert f"vLLM {TESTED_VLLM}" in (REPO / "benchmarks" / "RESULTS.md").read_text()
