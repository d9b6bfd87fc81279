"""`forge pipeline=tokenize` end to end through the real CLI: Megatron's own IndexedDataset reads
forge's .bin/.idx, the npy format, kill -9 then re-run, bad input, and a vocab that needs uint32."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import forge_cli, kill_forge_at_random, read_rows, read_stats, write_jsonl

from forge.data import TokenShards

pytestmark = pytest.mark.slow
WORDS = "the water of the river runs to the sea and light comes from a star over the mountain".split()


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 80))) for _ in range(n)]


def _args(tiny_model: Path, out: Path, *extra: str) -> list[str]:
    return ["pipeline=tokenize", f"tokenize.tokenizer={tiny_model}", f"output.dir={out}", *extra]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = forge_cli(args, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_megatron_reads_forges_bin_idx_and_its_mask(tiny_model: Path, tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    texts = _docs(400)
    pq.write_table(pa.table({"body": texts, "n": list(range(400))}), tmp_path / "docs.parquet")
    out = tmp_path / "tok"
    extra = ["dataset.text_column=body", "tokenize.format=megatron", "tokenize.shard_tokens=5000"]
    _run(_args(tiny_model, out, f"dataset.name={tmp_path / 'docs.parquet'}", *extra), tmp_path)
    index = json.loads((out / "index.json").read_text())
    [source] = index["sources"].values()
    assert len(source["shards"]) > 1 and source["documents"] == 400
    tok = AutoTokenizer.from_pretrained(tiny_model)
    got = []
    for shard in source["shards"]:
        ds = IndexedDataset(str(out / shard["prefix"]))
        mask = IndexedDataset(str(out / shard["prefix"]) + ".mask")
        assert len(ds) == len(mask) == shard["documents"] and list(ds.document_indices) == list(range(len(ds) + 1))
        assert int(ds.sequence_lengths.sum()) == shard["tokens"] <= 5000
        for i in range(len(ds)):
            assert np.array_equal(ds.sequence_lengths[i], mask.sequence_lengths[i]) and mask[i].all()
            got.append(np.array(ds[i]))  # a copy: the dataset unmaps its file when it goes
    assert all(int(g[-1]) == tok.eos_token_id for g in got)
    assert [tok.decode(g[:-1].tolist()) for g in got] == texts  # every document once, in order
    stats = read_stats(out)
    assert stats["tokenize"]["tokens"] == sum(len(g) for g in got)
    assert "## Tokens" in (out / "README.md").read_text()


def test_npy_shards_with_seq_len_and_the_loader_default(tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in _docs(200)])
    out = tmp_path / "tok"
    _run(_args(tiny_model, out, f"dataset.name={data}", "tokenize.format=npy", "tokenize.seq_len=32"), tmp_path)
    index = json.loads((out / "index.json").read_text())
    shard = next(iter(index["sources"].values()))["shards"][0]
    toks = np.load(out / f"{shard['prefix']}.tokens.npy", mmap_mode="r")
    docs = np.load(out / f"{shard['prefix']}.docs.npy")
    assert toks.dtype == np.uint16 and docs[-1] == len(toks) == shard["tokens"] and len(docs) == 201
    assert shard["sequences"] == (len(toks) - 1) // 32
    assert len(TokenShards(out)) == shard["sequences"] and TokenShards(out).seq_len == 32


def test_killed_at_a_random_moment_then_rerun_tokenizes_every_document_once(tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(_docs(3000))])
    extra = [f"dataset.name={data}", "output.examples_per_chunk=100", "cluster.tasks=2", "tokenize.shard_tokens=20000"]
    ref = tmp_path / "ref"
    _run(_args(tiny_model, ref, *extra), tmp_path)
    out = tmp_path / "tok"
    args = _args(tiny_model, out, *extra, "run.progress=false")
    kill_forge_at_random(args, tmp_path, (out / "data").is_dir, 1.5)
    _run(args, tmp_path)
    want, got = json.loads((ref / "index.json").read_text()), json.loads((out / "index.json").read_text())
    assert got == want
    for shard in next(iter(got["sources"].values()))["shards"]:
        for suffix in (".bin", ".idx", ".mask.bin", ".mask.idx"):
            assert (out / (shard["prefix"] + suffix)).read_bytes() == (ref / (shard["prefix"] + suffix)).read_bytes()
    assert not (out / "tokens" / ".partial").exists()
    assert sorted(r["id"] for r in read_rows(out)) == sorted(r["id"] for r in read_rows(ref))


def test_bad_input_names_the_key_file_or_row(tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in _docs(20)] + [{"text": " ".join(["water"] * 3000)}])
    missing = forge_cli(_args(tmp_path / "no_tokenizer", tmp_path / "a", f"dataset.name={data}"), tmp_path)
    assert missing.returncode == 2 and "tokenize.tokenizer" in missing.stderr and "no_tokenizer" in missing.stderr
    column = forge_cli(_args(tiny_model, tmp_path / "b", f"dataset.name={data}", "dataset.text_column=body"), tmp_path)
    assert column.returncode == 2 and "'body'" in column.stderr, column.stderr[-2000:]
    out = tmp_path / "c"
    _run(_args(tiny_model, out, f"dataset.name={data}", "tokenize.shard_tokens=1000"), tmp_path)
    [long] = read_rows(out, "rejected")
    assert (
        long["filter"] == "length" and "tokenize.shard_tokens=1000" in long["reason"] and long["where"].endswith(":21")
    )


def test_a_vocab_beyond_uint16_is_stored_as_uint32_or_megatrons_int32(tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000, "</s>": 70_001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    big = tmp_path / "big_tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]").save_pretrained(big)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "w1 w69999 w65536"}, {"text": "w3"}])
    for fmt in ("npy", "megatron"):
        out = tmp_path / fmt
        _run(["pipeline=tokenize", f"tokenize.tokenizer={big}", f"tokenize.format={fmt}", f"dataset.name={data}",
              f"output.dir={out}"], tmp_path)  # fmt: skip
        index = json.loads((out / "index.json").read_text())
        prefix = out / next(iter(index["sources"].values()))["shards"][0]["prefix"]
        if fmt == "npy":
            assert index["dtype"] == "uint32"
            assert np.load(f"{prefix}.tokens.npy").tolist() == [1, 69999, 65536, 70001, 3, 70001]
        else:
            assert index["dtype"] == "int32"
            ds = IndexedDataset(str(prefix))  # kept alive: it unmaps its file when it goes
            assert ds[0].tolist() == [1, 69999, 65536, 70001]
