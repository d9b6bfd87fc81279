import asyncio

from forge.cache import RequestCache, request_key
from forge.config import GenerationConfig
from forge.generate import cache_identity, request_body

MSGS = [{"role": "user", "content": "hi"}]
IDENT = {"model": "m", "revision": None, "engine": "vllm"}


def _key(gen: GenerationConfig, ident=IDENT, rollout: int = 0, msgs=MSGS) -> str:
    body = request_body(msgs, "served", gen, rollout)
    return request_key(cache_identity(body), ident, rollout)


def test_key_changes_with_everything_that_shapes_an_answer() -> None:
    base = _key(GenerationConfig())
    assert base == _key(GenerationConfig())
    variants = [
        _key(GenerationConfig(temperature=0.5)),
        _key(GenerationConfig(max_tokens=10)),
        _key(GenerationConfig(top_p=0.9)),
        _key(GenerationConfig(seed=1)),
        _key(GenerationConfig(stop=["x"])),
        _key(GenerationConfig(extra_body={"chat_template_kwargs": {"enable_thinking": False}})),
        _key(GenerationConfig(), ident={**IDENT, "model": "other"}),
        _key(GenerationConfig(), ident={**IDENT, "revision": "abc"}),
        _key(GenerationConfig(), ident={**IDENT, "engine": "sglang"}),
        _key(GenerationConfig(), rollout=1),
        _key(GenerationConfig(), msgs=[{"role": "user", "content": "hi!"}]),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_rollouts_get_distinct_seeds() -> None:
    gen = GenerationConfig(seed=100)
    assert [request_body(MSGS, "m", gen, r)["seed"] for r in range(3)] == [100, 101, 102]
    assert "seed" not in request_body(MSGS, "m", GenerationConfig(), 0)


def test_group_commit_and_reopen(tmp_path) -> None:
    async def go():
        async with RequestCache(tmp_path / "c.sqlite") as cache:
            await asyncio.gather(*(cache.put(f"k{i}", {"v": i}) for i in range(50)))
        async with RequestCache(tmp_path / "c.sqlite") as cache:
            found = await cache.get_many([f"k{i}" for i in range(60)])
            return found, await cache.count()

    found, count = asyncio.run(go())
    assert count == 50 and found["k7"] == {"v": 7} and "k55" not in found
