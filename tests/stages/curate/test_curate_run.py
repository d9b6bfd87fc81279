"""`forge pipeline=curate` end to end through the real CLI: mixes, the audit trail, resume after
kill -9, changed settings, bad input, and curating what forge generated."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import chat_rows, endpoint_args, forge_cli, read_rows, read_stats, write_jsonl

pytestmark = pytest.mark.slow


_chats = chat_rows


def _planted(n: int) -> list:
    """Good chats with broken ones planted at known lines (1-based line numbers as keys)."""
    rows: list = _chats(n)
    rows[3] = {"id": "no-assistant", "messages": [{"role": "user", "content": "hello?"}]}
    rows[7] = {
        "id": "empty-assistant",
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}],
    }
    rows[11] = {"id": "not-a-list", "messages": "just a string"}
    rows[15] = dict(rows[2])  # an exact duplicate of line 3
    return rows


def _curate(data: Path, out: Path, *extra: str) -> list[str]:
    return ["pipeline=curate", f"dataset.name={data}", f"output.dir={out}", *extra]


def _where_index(rows: list[dict]) -> Counter:
    return Counter(r["where"] for r in rows)


def test_defaults_normalize_and_remove_broken_chats_with_their_reasons(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chats.jsonl", _planted(40))
    with open(data, "a") as fh:
        fh.write("{not json\n")
    out = tmp_path / "cur"
    proc = forge_cli(_curate(data, out), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept, rejected = read_rows(out), read_rows(out, "rejected")
    assert len(kept) + len(rejected) == 41
    why = {r["where"].rsplit(":", 1)[1]: (r["filter"], r["reason"]) for r in rejected}
    assert why["4"] == ("chat_structure", "no_assistant_turn")
    assert why["8"] == ("chat_structure", "empty_assistant_turn")
    assert why["12"][0] == "normalize" and "messages" in why["12"][1]
    assert why["16"][0] == "dedup_exact"
    assert why["41"][0] == "input" and "JSON" in why["41"][1]
    assert all(r["row"] for r in rejected if r["filter"] != "input")
    assert {r["source"]["id"] for r in kept} == {f"c{i}" for i in range(40)} - {"c3", "c7", "c11", "c15"}
    stats = read_stats(out)
    assert stats["rows_in"] == 41 and stats["rows_kept"] == len(kept)
    assert stats["removed_by_filter"] == {"chat_structure": 2, "normalize": 1, "dedup_exact": 1, "input": 1}
    card = (out / "README.md").read_text()
    assert "chat_structure" in card and "pipeline=curate" in card


def test_mix_tiny_reaches_its_shares_and_writes_pools(tmp_path: Path) -> None:
    out = tmp_path / "mix"
    pools = ["+curate.pools.high_correctness=meta_correctness >= 0.8", "+curate.pools.tools=has_tool_calls"]
    proc = forge_cli(["pipeline=curate", "dataset=mix_tiny", f"output.dir={out}", *pools], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = read_stats(out)
    assert abs(stats["rows_in"] - 500) <= 40
    for label, share in stats["mix"].items():
        assert abs(share["sampled_share"] - share["requested_share"]) < 0.05, (label, share)
    kept = read_rows(out)
    high = read_rows(out / "pools", "high_correctness")
    assert high and all(r["meta_correctness"] >= 0.8 for r in high)
    assert len(high) == sum(1 for r in kept if (r["meta_correctness"] or 0) >= 0.8)
    tools = read_rows(out / "pools", "tools")
    assert tools and all(r["has_tool_calls"] for r in tools)
    assert {r["source"]["dataset"] for r in kept} == {"openai", "sharegpt", "pairs", "harmony", "documents"}
    assert any(
        r["messages"] and any(m["reasoning"] for m in r["messages"])
        for r in kept
        if r["source"]["dataset"] == "harmony"
    )
    card = (out / "README.md").read_text()
    assert "high_correctness" in card and "requested share" in card
    assert stats["pools"]["high_correctness"] == len(high)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_killed_at_a_random_moment_then_rerun_loses_and_duplicates_nothing(tmp_path: Path, sig: int) -> None:
    rows = _chats(3000)
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    out = tmp_path / "cur"
    args = _curate(data, out, "output.examples_per_chunk=40", "cluster.tasks=2", "run.progress=false")
    state = out / "state" / "batch_00000.json"
    rng = random.Random(int(time.time()))
    proc = subprocess.Popen(
        [sys.executable, "-m", "forge.cli", *args], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.2))
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        code = proc.wait()
        # SIGTERM stops like Ctrl-C (exit 130, the task's stats say interrupted); kill -9 just dies
        # (0: it finished between the poll and the kill)
        if sig == signal.SIGTERM and code == -signal.SIGTERM:
            # it landed while the interpreter was exiting (Python resets its handlers then): done
            assert read_stats(out)["rows_in"] == 3000
        else:
            assert code in (130 if sig == signal.SIGTERM else -signal.SIGKILL, 0)
    proc.wait()
    again = forge_cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    kept, rejected = read_rows(out), read_rows(out, "rejected")
    ids = Counter(r["source"]["id"] for r in kept)
    assert not [k for k, n in ids.items() if n > 1], "duplicated rows"
    assert set(ids) | {json.loads(r["row"])["id"] for r in rejected} == {r["id"] for r in rows}
    assert len(kept) + len(rejected) == 3000
    assert read_stats(out)["rows_in"] == 3000


def test_changed_filters_stop_with_what_changed_and_fresh_starts_over(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chats.jsonl", _chats(30))
    out = tmp_path / "cur"
    assert forge_cli(_curate(data, out), tmp_path).returncode == 0
    changed = forge_cli(_curate(data, out, "curate.filters=[{name: max_turns, max: 1}]"), tmp_path)
    assert changed.returncode == 2
    assert "settings.curate.filters" in changed.stderr, changed.stderr
    assert len(read_rows(out)) == 30  # nothing already done is lost
    fresh = forge_cli(
        _curate(data, out, "curate.filters=[{name: max_turns, max: 1}]", "output.on_change=fresh"), tmp_path
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert len(read_rows(out)) == 0 and len(read_rows(out, "rejected")) == 30
    assert {r["filter"] for r in read_rows(out, "rejected")} == {"max_turns"}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["dataset.sources.1.columns.prompt=questoin"], "dataset.sources[1].columns.prompt (pairs)"),
        (["dataset.sources.0.weight=0"], "dataset.sources[0].weight: must be > 0"),
        (["curate.filters=[{name: gopher_qualty}]"], "unknown filter 'gopher_qualty'"),
        (["+curate.pools.High=has_tool_calls", "+curate.pools.high=has_tool_calls"], "used twice"),
        (["+curate.pools.bad=meta_correctnes > 1"], "curate.pools.bad"),
    ],
)
def test_bad_input_is_one_line_naming_the_key_and_writes_nothing(
    tmp_path: Path, overrides: list[str], expected: str
) -> None:
    out = tmp_path / "mix"
    pairs = [
        "dataset.sources=[{name: forge://mix_tiny/openai, format: messages},"
        " {name: forge://mix_tiny/pairs, label: pairs, format: prompt_response,"
        " columns: {prompt: question, response: answer}}]"
    ]
    proc = forge_cli(["pipeline=curate", "dataset=mix_tiny", *pairs, f"output.dir={out}", *overrides], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    first = next(line for line in proc.stderr.splitlines() if line.startswith("forge:"))
    assert expected in first, proc.stderr
    assert not out.exists()


def test_curate_what_forge_generated(tmp_path: Path, cpu_server: dict) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": f"say {i}"} for i in range(6)])
    gen = tmp_path / "gen"
    proc = forge_cli(
        [
            *endpoint_args(cpu_server),
            f"dataset.name={data}",
            "dataset.id_column=id",
            "generation.max_tokens=8",
            f"output.dir={gen}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "cur"
    proc = forge_cli(_curate(gen, out, "curate.filters=[]"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept, rejected = read_rows(out), read_rows(out, "rejected")
    assert len(kept) + len(rejected) == 6
    assert {r["source"]["id"] for r in kept} <= {f"p{i}:0" for i in range(6)}  # (id, rollout)
    for r in kept:
        assert r["messages"][0]["role"] == "user" and r["messages"][-1]["role"] == "assistant"


def test_a_sized_mix_reaches_its_shares_in_the_kept_rows(tmp_path: Path) -> None:
    """Half of source b is removed by the filters: forge reads twice as much of it, so the KEPT
    rows have the requested 1:1 shares and about target_rows rows."""
    good = _chats(1000)
    half = [
        r if i % 2 else {"id": f"bad{i}", "messages": [{"role": "user", "content": f"alone {i}"}]}
        for i, r in enumerate(_chats(1000, seed=1))
    ]
    a, b = write_jsonl(tmp_path / "a.jsonl", good), write_jsonl(tmp_path / "b.jsonl", half)
    out = tmp_path / "mix"
    sources = f"dataset.sources=[{{name: '{a}', label: a}}, {{name: '{b}', label: b}}]"
    proc = forge_cli(["pipeline=curate", sources, "dataset.target_rows=400", f"output.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = Counter(r["source"]["dataset"] for r in read_rows(out))
    assert abs(sum(kept.values()) - 400) <= 40, kept
    assert abs(kept["a"] / sum(kept.values()) - 0.5) < 0.06, kept
    mix = read_stats(out)["mix"]
    assert abs(mix["b"]["pilot_pass_rate"] - 0.5) < 0.01 and mix["b"]["sampled_share"] > 0.6


def test_a_curate_run_dir_is_passed_through_by_the_next_curate(tmp_path: Path) -> None:
    first, second = tmp_path / "c1", tmp_path / "c2"
    assert forge_cli(["pipeline=curate", "dataset=mix_tiny", f"output.dir={first}"], tmp_path).returncode == 0
    proc = forge_cli(["pipeline=curate", f"dataset.name={first}", f"output.dir={second}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_rows(first), read_rows(second)
    assert [(r["id"], r["source"], r["meta_correctness"], r["meta_domain"]) for r in a] == [
        (r["id"], r["source"], r["meta_correctness"], r["meta_domain"]) for r in b
    ]


def test_target_tokens_counts_the_kept_normalized_text(tmp_path: Path) -> None:
    out = tmp_path / "tok"
    args = ["pipeline=curate", "dataset=mix_tiny", "dataset.target_rows=null", "+dataset.target_tokens=20000"]
    proc = forge_cli([*args, f"output.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chars = Counter()
    for r in read_rows(out):
        text = r["text"] if r["text"] is not None else "\n\n".join(m["content"] or "" for m in r["messages"])
        chars[r["source"]["dataset"]] += len(text)
    assert abs(sum(chars.values()) / 4 - 20000) < 2000
    for label, m in read_stats(out)["mix"].items():
        assert abs(chars[label] / sum(chars.values()) - m["requested_share"]) < 0.04, (label, m)
