import json

from forge.config import EngineKind, ModelConfig
from forge.engine.commands import build_command, extra_args
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
    assert args[:3] == ["vllm", "serve", "Qwen/Qwen3-4B"]
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
