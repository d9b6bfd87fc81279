from forge.engine.capacity import DEFAULT_IN_FLIGHT, choose_in_flight, kv_tokens_from_metrics
from forge.engine.compile_cache import cache_dir, entries, is_warm, locked
from forge.engine.config import EngineKind, ModelConfig
from forge.engine.inprocess import engine_kwargs

METRICS = """# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",gpu_memory_utilization="0.9",num_gpu_blocks="39250"} 1.0
vllm:num_requests_running{engine="0"} 0.0
"""


def test_kv_capacity_from_vllm_metrics() -> None:
    assert kv_tokens_from_metrics(METRICS) == 39250 * 16
    assert kv_tokens_from_metrics("vllm:num_requests_running 0") is None


def test_in_flight_fits_the_kv_cache() -> None:
    # the kit's H100 workload: ~628k KV tokens, ~160 prompt + 1024 output tokens -> about 530
    limit, why = choose_in_flight(None, 628_000, 1184, None)
    assert limit == 530 and "628,000" in why
    assert choose_in_flight(None, 628_000, 1184, 256)[0] == 256  # max_num_seqs caps it
    # batches past the largest CUDA graph run eager: 532 in flight ran 28% slower than 512
    limit, why = choose_in_flight(None, 629_376, 1182, None, graph_cap=512)
    assert limit == 768 and "capped by the CUDA-graph batch limit 512" in why and "512 running + 256 queued" in why
    assert choose_in_flight(None, 10_000_000, 100, None)[0] == 1024
    assert choose_in_flight(48, 628_000, 1184, None) == (48, "run.max_in_flight")
    assert choose_in_flight(None, None, 1184, None)[0] == DEFAULT_IN_FLIGHT
    # data parallel: every limit is per engine (dp=2 on 2 H200s: 1.81x tp=1 at 768, 2.00x at 1,536)
    limit, why = choose_in_flight(None, 629_376, 1182, 512, graph_cap=512, engines=2)
    assert limit == 1536 and "x 2 data-parallel engines" in why and "1024 running + 512 queued" in why


def test_async_engine_kwargs_mirror_serve_flags() -> None:
    m = ModelConfig(
        name_or_path="Qwen/Qwen3-1.7B",
        engine=EngineKind.vllm_async,
        tp=2,
        max_model_len=4096,
        gpu_memory_utilization=0.9,
        max_num_seqs=512,
        speculative={"method": "ngram"},
        load_format="dummy",
        engine_args={"dtype": "bfloat16", "enable-prefix-caching": True},
    )
    kw = engine_kwargs(m, "/models/q", seed=3)
    assert kw["model"] == "/models/q" and kw["tensor_parallel_size"] == 2 and kw["max_num_seqs"] == 512
    assert kw["speculative_config"] == {"method": "ngram"} and kw["load_format"] == "dummy" and kw["seed"] == 3
    assert kw["dtype"] == "bfloat16" and kw["enable_prefix_caching"] is True and kw["trust_remote_code"] is False
    assert "quantization" not in kw and "kv_cache_dtype" not in kw


def test_compile_cache_lock_and_warmth(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    path = cache_dir(str(tmp_path / "cc"))
    with locked(path) as warm:
        assert not warm
        import os

        assert os.environ["VLLM_CACHE_ROOT"] == str(path)
    (path / "torch_compile_cache" / "abc").mkdir(parents=True)
    assert is_warm(path) and entries(path) == {"abc"}
