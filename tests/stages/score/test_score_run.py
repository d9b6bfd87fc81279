"""`forge pipeline=score` on the CPU engine (transformers, the tiny model): completion-only NLL
checked token by token against an independent computation (transformers' own assistant mask
from a `{% generation %}` template), windows for long rows, embeddings and their .npy, pools by
quantile over the whole run, kill -9 then re-run. The GPU tier (vLLM) is test_score_gpu.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import forge_cli, kill_forge_at_random, qwen_like_template, read_rows, read_stats, write_jsonl

pytestmark = pytest.mark.slow
# the tiny model's ChatML, with the markers transformers needs for its own assistant mask
GENERATION_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
)


def _chats(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "the water of the river runs to the sea and light comes from a star".split()

    def say(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    rows = []
    for i in range(n):
        turns = [{"role": "system", "content": "be brief"}] if i % 3 == 0 else []
        for _ in range(1 + i % 3):  # multi-turn
            turns += [{"role": "user", "content": say(6)}, {"role": "assistant", "content": say(rng.randint(3, 12))}]
        rows.append({"id": f"c{i}", "messages": turns})
    return rows


def _independent_nll(tiny_model: Path, messages: list[dict], template: str = GENERATION_TEMPLATE) -> tuple:
    """Per-token NLL of the assistant tokens, computed without forge."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    enc = tok.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = torch.tensor([enc["input_ids"]])
    mask = np.array(enc["assistant_masks"], dtype=bool)
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    per_token = -logp.gather(-1, ids[0, 1:, None])[:, 0].double().numpy()
    return per_token, mask[1:], ids[0, 1:].numpy()


def test_nll_matches_an_independent_computation_token_by_token(tiny_model: Path, tmp_path: Path) -> None:
    rows = _chats(12)
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    out = tmp_path / "nll"
    args = ["pipeline=score", "model=tiny_cpu", f"dataset.name={data}", f"output.dir={out}", "score.per_token=true"]
    proc = forge_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {r["source"]["id"]: r for r in read_rows(out)}
    assert len(got) == 12
    for row in rows:
        per_token, mask, ids = _independent_nll(tiny_model, row["messages"])
        r = got[row["id"]]
        assert r["n_scored_tokens"] == mask.sum()
        assert r["scored_token_ids"] == ids[mask].tolist()  # the same tokens, token by token
        assert np.abs(np.asarray(r["token_nll"]) - per_token[mask]).max() < 1e-3
        assert abs(r["nll_sum"] - per_token[mask].sum()) < 1e-3 * mask.sum()
        assert abs(r["nll_mean"] - per_token[mask].mean()) < 1e-4
        assistant_turns = sum(1 for m in row["messages"] if m["role"] == "assistant")
        assert len(r["turn_nll_sum"]) == len(r["turn_tokens"]) == assistant_turns
        assert sum(r["turn_tokens"]) == r["n_scored_tokens"]
    stats = read_stats(out)
    assert stats["score"]["scored_tokens"] == sum(r["n_scored_tokens"] for r in got.values())
    assert stats["score"]["scored_tokens_per_s"] > 0 and (out / "score_hist.png").exists()


def _reasoning_chats(n: int) -> list[dict]:
    rng = random.Random(7)
    words = "the water of the river runs to the sea and light comes from a star".split()

    def say(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    rows = []
    for i in range(n):
        turns = [{"role": "user", "content": say(5)}]
        turns.append({"role": "assistant", "content": say(4), "reasoning": say(6)})  # dropped once a user follows
        if i % 2:
            turns.append({"role": "user", "content": say(5)})
        turns.append({"role": "assistant", "content": say(3 + i % 4), "reasoning": say(5)})
        turns.append({"role": "assistant", "content": say(4), "reasoning": say(3)})  # agent-like: two in a row
        rows.append({"id": f"r{i}", "messages": turns})
    return rows


@pytest.mark.parametrize("reasoning", [True, False])
def test_reasoning_chats_match_an_independent_computation(tiny_model: Path, tmp_path: Path, reasoning: bool) -> None:
    """A Qwen3-like template that drops past reasoning; forge (no generation markers: its own
    masks) against transformers' assistant mask from the same template with markers."""
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "qwen_like"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = qwen_like_template()
    tok.save_pretrained(model)
    marked = qwen_like_template("reasoning" if reasoning else "content")
    rows = _reasoning_chats(8)
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    out = tmp_path / "nll"
    args = ["pipeline=score", "model=tiny_cpu", f"model.name_or_path={model}", f"dataset.name={data}"]
    proc = forge_cli([*args, f"output.dir={out}", f"score.reasoning={str(reasoning).lower()}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {r["source"]["id"]: r for r in read_rows(out)}
    assert len(got) == len(rows)
    for row in rows:
        messages = [
            {"role": m["role"], "content": m["content"], "reasoning_content": m.get("reasoning", "")}
            for m in row["messages"]
        ]
        per_token, mask, _ = _independent_nll(model, messages, marked)
        r = got[row["id"]]
        assert r["n_scored_tokens"] == mask.sum(), row["id"]
        assert abs(r["nll_sum"] - per_token[mask].sum()) < 1e-3 * mask.sum()
        runs = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
        expected_turns = [float(per_token[a:b].sum()) for a, b in zip(runs[::2], runs[1::2], strict=True)]
        assert r["turn_nll_sum"] == pytest.approx(expected_turns, abs=1e-3 * mask.sum())


def test_long_rows_are_windowed_or_quarantined(tiny_model: Path, tmp_path: Path) -> None:
    text = " ".join(["the water of the river runs to the sea"] * 40)
    data = write_jsonl(tmp_path / "docs.jsonl", [{"id": "long", "text": text}, {"id": "short", "text": "the sea"}])
    base = ["pipeline=score", "model=tiny_cpu", f"dataset.name={data}"]
    whole = tmp_path / "whole"
    assert forge_cli([*base, f"output.dir={whole}"], tmp_path).returncode == 0
    win = tmp_path / "win"
    proc = forge_cli([*base, f"output.dir={win}", "score.max_len=64", "score.overlap=16"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    full = {r["source"]["id"]: r for r in read_rows(whole)}
    cut = {r["source"]["id"]: r for r in read_rows(win)}
    assert cut["long"]["n_scored_tokens"] == full["long"]["n_scored_tokens"]  # every token once
    assert cut["long"]["nll_sum"] != pytest.approx(full["long"]["nll_sum"], abs=1e-6)  # with less context
    assert cut["short"]["nll_sum"] == pytest.approx(full["short"]["nll_sum"], abs=1e-6)
    q = tmp_path / "q"
    proc = forge_cli([*base, f"output.dir={q}", "score.max_len=64", "score.on_long=quarantine"], tmp_path)
    assert proc.returncode == 0
    [long] = read_rows(q, "rejected")
    assert long["filter"] == "length" and "score.max_len=64" in long["reason"]


def test_embeddings_views_npy_and_pools_by_quantile(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chats.jsonl", _chats(30))
    out = tmp_path / "emb"
    args = ["pipeline=score", "model=tiny_cpu", "score.kind=embed", f"dataset.name={data}", f"output.dir={out}"]
    proc = forge_cli([*args, "score.npy=true", "score.view=user"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_rows(out)
    matrix = np.load(out / "embeddings.npy")
    ids = json.loads((out / "embeddings_ids.json").read_text())
    assert matrix.shape[0] == len(rows) == len(ids) == 30 and matrix.shape[1] == len(rows[0]["embedding"])
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1, atol=1e-4)
    by_id = {r["id"]: r["embedding"] for r in rows}
    assert all(np.allclose(matrix[i], by_id[rid]) for i, rid in enumerate(ids))  # row i is ids[i]
    answers = tmp_path / "answers"
    assert forge_cli([*args, "score.view=assistant", f"output.dir={answers}"], tmp_path).returncode == 0
    a, b = read_rows(out)[0]["embedding"], read_rows(answers)[0]["embedding"]
    assert not np.allclose(a, b)
    nll = tmp_path / "nll"
    pool = "+score.pools.top_half=nll_mean <= quantile(0.5)"
    proc = forge_cli(["pipeline=score", "model=tiny_cpu", f"dataset.name={data}", f"output.dir={nll}", pool], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = read_rows(nll)
    top = read_rows(nll / "pools", "top_half")
    median = float(np.quantile([r["nll_mean"] for r in kept], 0.5))
    assert top and {r["id"] for r in top} == {r["id"] for r in kept if r["nll_mean"] <= median}
    assert (
        read_stats(nll)["pools"]["top_half"] == len(top)
        and "quantile" not in read_stats(nll)["score"]["pools_resolved"]["top_half"]
    )
    assert "top_half" in (nll / "README.md").read_text()


def test_killed_then_rerun_scores_every_row_once(tmp_path: Path) -> None:
    """kill -9 twice at random moments after the first chunk, then re-run: every row scored once,
    with the same scores as an uninterrupted run."""
    data = write_jsonl(tmp_path / "chats.jsonl", _chats(200))
    args = ["pipeline=score", "model=tiny_cpu", f"dataset.name={data}", "output.examples_per_chunk=20"]
    args += ["run.progress=false"]
    ref = tmp_path / "ref"
    assert forge_cli([*args, f"output.dir={ref}"], tmp_path).returncode == 0
    out = tmp_path / "nll"
    kill_forge_at_random([*args, f"output.dir={out}"], tmp_path, (out / "data").is_dir, 1.0)
    again = forge_cli([*args, f"output.dir={out}"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    got = {r["source"]["id"]: r["nll_sum"] for r in read_rows(out)}
    want = {r["source"]["id"]: r["nll_sum"] for r in read_rows(ref)}
    assert len(read_rows(out)) == 200 and got == pytest.approx(want)
    assert read_stats(out)["rows_in"] == 200
