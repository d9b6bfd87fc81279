"""forge/data: packed sequences from a real tokenize run dir (labels, boundaries, positions), the
weighted mixture (shares, phases, ranks), exact resume, and torch's DataLoader with workers."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import run_batch_stage, write_jsonl

from forge.config import ForgeConfig, SourceSpec, validate
from forge.data import IGNORE, MixtureDataset, MixtureSampler, TokenShards

SEQ = 64


@pytest.fixture(scope="module", params=["megatron", "npy"])
def run_dir(request: pytest.FixtureRequest, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp(f"tok_{request.param}")
    words = "the water of the river runs to the sea and light comes from a star".split()
    rng = np.random.default_rng(0)
    web = [{"id": f"w{i}", "text": " ".join(rng.choice(words, rng.integers(5, 60)))} for i in range(300)]
    math = [
        {"id": f"m{i}", "messages": [{"role": "user", "content": f"what is {i} plus one"},
                                     {"role": "assistant", "content": f"it is {i + 1}"}]}
        for i in range(300)
    ]  # fmt: skip
    cfg = ForgeConfig()
    cfg.pipeline.stage = "tokenize"
    cfg.dataset.sources = [
        SourceSpec(name=str(write_jsonl(tmp / "web.jsonl", web)), label="web"),
        SourceSpec(name=str(write_jsonl(tmp / "math.jsonl", math)), label="math"),
    ]
    cfg.tokenize.tokenizer = str(tiny_model)
    cfg.tokenize.format = request.param
    cfg.tokenize.shard_tokens = 4000  # several shards per source
    cfg.output.dir = str(tmp / "out")
    cfg.run.progress = False
    validate(cfg)
    run_batch_stage(cfg)
    return Path(cfg.output.dir)


def _flat(run: Path, source: str) -> tuple[np.ndarray, np.ndarray, set[int]]:
    """A source's whole token stream, mask and document starts, from the shards one by one."""
    ds = TokenShards(run, SEQ, source)
    toks, masks, starts, at = [], [], set(), 0
    for k in range(len(ds.shards)):
        t, m, s = ds.shards[k].open()
        toks.append(np.asarray(t))
        masks.append(np.asarray(m))
        starts |= {at + int(x) for x in s[:-1]}
        at += len(t)
    return np.concatenate(toks), np.concatenate(masks), starts


def test_sequences_carry_labels_masks_boundaries_and_positions(run_dir: Path) -> None:
    for source in ("web", "math"):
        ds = TokenShards(run_dir, SEQ, source)
        assert len(ds.shards) > 1 and len(ds) > 10
        checked = 0
        for k in range(len(ds.shards)):
            toks, mask, starts = ds.shards[k].open()
            for i in range(int(ds.bounds[k]), int(ds.bounds[k + 1])):
                item = ds[i]
                s = (i - int(ds.bounds[k])) * SEQ
                assert np.array_equal(item["input_ids"], toks[s : s + SEQ])
                doc_starts = set(int(x) for x in starts)
                for j in range(SEQ):
                    nxt = s + j + 1
                    want = IGNORE if (mask[nxt] == 0 or nxt in doc_starts) else int(toks[nxt])
                    assert item["labels"][j] == want, (source, i, j)
                    last_start = max([x for x in doc_starts if s <= x <= s + j] or [s])
                    assert item["position_ids"][j] == s + j - last_start
                checked += 1
        assert checked == len(ds)
    math = TokenShards(run_dir, SEQ, "math")
    assert any((math[i]["labels"] == IGNORE).any() for i in range(len(math)))  # prompts are not trained on


def test_every_document_ends_with_eos_and_chats_train_only_on_answers(run_dir: Path) -> None:
    import json

    eos = json.loads((run_dir / "index.json").read_text())["eos_id"]
    toks, mask, starts = _flat(run_dir, "math")
    ends = sorted(x - 1 for x in starts if x)
    assert all(int(toks[e]) == eos for e in ends)
    assert 0 < mask.mean() < 0.5  # answers only


def _take(sampler: MixtureSampler, n: int) -> list[tuple[str, int]]:
    return list(itertools.islice(sampler, n))  # exactly n: zip would draw one more


def _sources(sampler: MixtureSampler, n: int) -> list[str]:
    return [source for source, _ in _take(sampler, n)]


def test_the_mixture_reaches_its_shares_and_follows_its_phases() -> None:
    sampler = MixtureSampler({"web": 0.7, "math": 0.3})
    draws = _sources(sampler, 10_000)
    share = draws.count("math") / len(draws)
    assert abs(share - 0.3) < 0.01
    hot = MixtureSampler({"web": 1, "math": 1}, temperature=2.0)
    assert abs(_sources(hot, 1000).count("web") / 1000 - 0.5) < 0.01
    annealed = MixtureSampler(
        {"web": 0.9, "math": 0.1}, phases=[{"step": 100, "weights": {"math": 1.0}}], batch_size=10
    )
    draws = _sources(annealed, 2000)
    assert abs(draws[:1000].count("math") / 1000 - 0.1) < 0.01 and draws[1000:] == ["math"] * 1000


def test_ranks_split_the_draws_and_each_rank_resumes_exactly() -> None:
    world = [MixtureSampler({"a": 0.5, "b": 0.3, "c": 0.2}, rank=r, world_size=4) for r in range(4)]
    streams = [_take(s, 250) for s in world]
    one = _take(MixtureSampler({"a": 0.5, "b": 0.3, "c": 0.2}), 1000)
    assert [streams[g % 4][g // 4] for g in range(1000)] == one  # draw g is rank g % 4's
    s = MixtureSampler({"a": 0.5, "b": 0.3, "c": 0.2}, rank=2, world_size=4)
    first = _take(s, 30)
    state = s.state_dict()
    rest = _take(s, 30)
    again = MixtureSampler({"a": 0.5, "b": 0.3, "c": 0.2}, rank=2, world_size=4)
    again.load_state_dict(state)
    assert _take(again, 30) == rest and first + rest == streams[2][:60]


def test_a_state_of_other_sources_or_batch_size_is_refused() -> None:
    s = MixtureSampler({"a": 0.5, "b": 0.5}, batch_size=4)
    _take(s, 10)
    state = s.state_dict()
    refused = {
        "sources ['a', 'b'] loaded into a sampler of the sources ['a', 'c'] "
        "(only in the state: ['b']; only in the sampler: ['c'])": (
            MixtureSampler({"a": 0.5, "c": 0.5}, batch_size=4),
            state,
        ),
        "sources ['a', 'b'] loaded into a sampler of the sources ['a', 'b', 'c']": (
            MixtureSampler({"a": 0.4, "b": 0.3, "c": 0.3}, batch_size=4),
            state,
        ),
        "batch_size 4 loaded into a sampler of batch_size 8": (
            MixtureSampler({"a": 0.5, "b": 0.5}, batch_size=8),
            state,
        ),
        "batch_size 0 refused: batch_size must be an int >= 1": (
            MixtureSampler({"a": 0.5, "b": 0.5}, batch_size=4),
            {**state, "batch_size": 0},
        ),
        "counts {'a': 5, 'b': 9} (credit over 2 sources) do not add up to its draw 10": (
            MixtureSampler({"a": 0.5, "b": 0.5}, batch_size=4),
            {**state, "counts": {"a": 5, "b": 9}},
        ),
    }
    for message, (sampler, bad) in refused.items():
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            sampler.load_state_dict(bad)
        assert "\n" not in str(info.value)
        assert sampler.draw == 0  # nothing of the refused state was taken
    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            MixtureSampler({"a": 1.0}, batch_size=bad)
    assert MixtureSampler({"a": 1.0}, batch_size=np.int64(4)).batch_size == 4  # numpy's ints are ints
    again = MixtureSampler({"a": 0.5, "b": 0.5}, batch_size=4)
    again.load_state_dict(state)  # the same sampler's state still loads
    assert _take(again, 5) == _take(s, 5)
    legacy = {k: v for k, v in state.items() if k != "batch_size"}  # saved before batch_size was recorded
    older = MixtureSampler({"a": 0.5, "b": 0.5}, batch_size=4)
    older.load_state_dict(legacy)
    assert older.draw == 10


def test_a_dataloader_with_workers_resumes_batch_for_batch(run_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    data = MixtureDataset({name: TokenShards(run_dir, SEQ, name) for name in ("web", "math")}, seed=3)

    def batches(sampler: MixtureSampler, n: int) -> list[dict]:
        loader = DataLoader(data, batch_size=4, sampler=sampler, num_workers=2, collate_fn=None)
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
        return out

    weights = {"web": 0.6, "math": 0.4}
    whole = batches(MixtureSampler(weights, phases=[{"step": 5, "weights": {"math": 1}}], batch_size=4), 12)
    first = MixtureSampler(weights, phases=[{"step": 5, "weights": {"math": 1}}], batch_size=4)
    head = batches(first, 7)
    state = first.state_dict(consumed=7 * 4)  # the loader prefetched further than the loop took
    resumed = MixtureSampler(weights, phases=[{"step": 5, "weights": {"math": 1}}], batch_size=4)
    resumed.load_state_dict(state)
    tail = batches(resumed, 5)
    for a, b in zip(whole, head + tail, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        assert a["source"] == b["source"]
    assert whole[-1]["source"] == ["math"] * 4  # the annealing phase


def test_the_loader_imports_without_hydra_or_an_engine() -> None:
    import subprocess
    import sys

    code = (
        "import sys, forge.data; "
        "bad = [m for m in ('hydra', 'omegaconf', 'transformers', 'vllm', 'aiohttp') if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
