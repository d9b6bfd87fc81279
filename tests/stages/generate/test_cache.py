import asyncio
from pathlib import Path

import pytest

from forge.stages.generate.cache import RequestCache, check_cache, request_key
from forge.stages.generate.config import GenerationConfig
from forge.stages.generate.generator import cache_identity, request_body

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


def _filled_cache(path: Path, n: int = 200) -> None:
    async def fill() -> None:
        async with RequestCache(path) as cache:
            for i in range(n):
                await cache.put(f"k{i}", {"text": "x" * 200})

    asyncio.run(fill())


def test_check_cache_keeps_a_healthy_cache(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    _filled_cache(path)
    assert check_cache(path) is None and path.exists()
    assert check_cache(tmp_path / "absent.sqlite") is None


@pytest.mark.parametrize("damage", ["header", "torn"])
def test_check_cache_moves_a_damaged_cache_aside(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "c.sqlite"
    _filled_cache(path)
    blob = bytearray(path.read_bytes())
    if damage == "header":
        blob[:100] = b"\x00" * 100
    else:  # a page in the middle overwritten
        blob[4096 * 2 : 4096 * 3] = b"\xff" * 4096
    path.write_bytes(bytes(blob))
    for side in ("-wal", "-shm"):
        Path(str(path) + side).unlink(missing_ok=True)
    moved = check_cache(path)
    if damage == "torn" and moved is None:
        pytest.skip("the overwritten page held no b-tree page sqlite checks")
    assert moved is not None and moved.exists() and not path.exists()

    async def reopen() -> int:  # the run goes on with a fresh cache, and ends (no hang)
        async with RequestCache(path) as cache:
            return await cache.count()

    assert asyncio.run(asyncio.wait_for(reopen(), 10)) == 0


def test_a_big_cache_gets_a_light_check_unless_a_run_found_it_damaged(tmp_path: Path, monkeypatch) -> None:
    import forge.stages.generate.cache

    path = tmp_path / "c.sqlite"
    _filled_cache(path)
    monkeypatch.setattr(forge.stages.generate.cache, "FULL_CHECK_BYTES", 0)  # every cache counts as big
    marker = path.with_name(path.name + ".suspect")
    marker.touch()  # a run hit an error that looked like damage: the next check is in full
    assert check_cache(path) is None and not marker.exists()
    with open(path, "r+b") as fh:
        fh.write(b"\x00" * 100)
    assert check_cache(path) is not None and not path.exists()  # the light check still sees a bad header
