"""The decontaminate filter: benchmark items hidden in documents and chats (verbatim, re-cased,
re-punctuated, inside longer turns) are removed with the benchmark, item and n-gram; unrelated
rows stay; the index is cached by content; Hub ids are read from the local cache only."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import forge_cli, read_rows, read_stats, write_jsonl

from forge.schema import ConfigError
from forge.stages.curate.decontaminate import cache_root
from forge.stages.curate.filters import build_filters

QUESTION = (
    "A farmer plants seventeen rows of apple trees with nine trees in each row and then sells a third "
    "of the apples picked from them at the weekly market in town."
)
SHORT = "Which planet in our solar system has the longest day?"  # 10 words: indexed whole


@pytest.fixture
def bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FORGE_CACHE", str(tmp_path / "cache"))
    rows = [
        {"id": "q-1", "question": QUESTION, "answer": "The answer is 51."},
        {"id": "q-2", "question": SHORT, "answer": "Venus"},
        {"id": "q-3", "question": "Too short.", "answer": "x"},
    ]
    return write_jsonl(tmp_path / "bench.jsonl", rows)


def _filter(bench: Path, **options):
    return build_filters([{"name": "decontaminate", "benchmarks": [str(bench)], **options}], None)[0]


def test_planted_items_are_found_and_unrelated_rows_stay(bench: Path) -> None:
    f = _filter(bench)
    hidden = [
        {"text": QUESTION},
        {"text": "Intro words here. " + QUESTION.upper() + " Some more words after it."},
        {"text": QUESTION.replace(",", "").replace(".", " !") + " thanks"},
        {"messages": [{"role": "user", "content": "Solve: " + QUESTION}, {"role": "assistant", "content": "51"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Q: " + SHORT.lower()}]},
    ]
    removals = [f.check(row) for row in hidden]
    for row, removal in zip(hidden, removals, strict=True):
        assert removal is not None and removal.reason == "contaminated", row
        assert removal.value["benchmark"] == "bench" and removal.value["item"] in ("q-1", "q-2")
    value = removals[0].value
    assert (
        value["item"] == "q-1"
        and value["ngram"] == "a farmer plants seventeen rows of apple trees with nine trees in each"
    )
    clean = [
        {"text": "A farmer plants seventeen rows of corn, and the weather this year was kind to the whole valley."},
        {"text": "Which planet has rings? Saturn does, and so do the other giants of the solar system."},
        {"messages": [{"role": "user", "content": "Too short."}, {"role": "assistant", "content": "x"}]},
    ]
    assert [f.check(r) for r in clean] == [None, None, None]
    assert f.batch_counts() == {"contaminated_rows": {"bench": 5}}


def test_accents_numbers_and_underscores_are_normalized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_CACHE", str(tmp_path / "cache"))
    item = "At the café near the station 24 students paid 3 dollars each for the_lunch menu on Friday"
    bench = write_jsonl(tmp_path / "b.jsonl", [{"id": "n-1", "question": item}])
    f = build_filters([{"name": "decontaminate", "benchmarks": [str(bench)]}], None)[0]
    rewritten = "At the cafe near the station 31 students paid 5 dollars each for the lunch menu on Friday"
    removal = f.check({"text": rewritten})
    assert removal is not None and removal.value["item"] == "n-1" and "31 students" in removal.value["ngram"]
    keep_numbers = build_filters([{"name": "decontaminate", "benchmarks": [str(bench)], "zero_numbers": False}], None)
    assert keep_numbers[0].check({"text": rewritten}) is None
    assert keep_numbers[0].check({"text": item.upper()}) is not None


def test_roles_choose_the_turns_and_min_overlap_counts_ngrams(bench: Path) -> None:
    chat = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "51"}]}
    assert _filter(bench, roles=["assistant"]).check(chat) is None
    assert _filter(bench, roles=["user"]).check(chat) is not None
    half = " ".join(QUESTION.split()[:14])  # two 13-grams of the item
    assert _filter(bench, min_overlap=2).check({"text": half}) is not None
    assert _filter(bench, min_overlap=3).check({"text": half}) is None
    assert _filter(bench, n=8).check({"text": " ".join(QUESTION.split()[10:19])}) is not None


def test_the_index_is_cached_by_content(bench: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="forge.stages.curate"):
        _filter(bench)
        assert "built in" in caplog.text
        caplog.clear()
        _filter(bench)
        assert "from the cache" in caplog.text and "built in" not in caplog.text
        caplog.clear()
        with open(bench, "a") as fh:  # a changed benchmark file: another index
            fh.write(json.dumps({"id": "q-4", "question": "a brand new item " * 4}) + "\n")
        _filter(bench)
        assert "built in" in caplog.text
    assert len(list(cache_root().glob("*.npz"))) == 2


def test_hub_ids_come_from_the_local_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub id is read through huggingface_hub's own cache layout (offline); one that is not
    cached is one line naming it and the command that fetches it once."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))  # read at import: already imported
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FORGE_CACHE", str(tmp_path / "cache"))
    snap = hub / "datasets--cais--mmlu" / "snapshots" / ("a" * 40)
    (snap / "all").mkdir(parents=True)
    (hub / "datasets--cais--mmlu" / "refs").mkdir()
    (hub / "datasets--cais--mmlu" / "refs" / "main").write_text("a" * 40)
    table = pa.table(
        {
            "question": [SHORT, "What is the boiling point of water at sea level in degrees?"],
            "choices": [["Venus", "Mars"], ["90", "100"]],
            "subject": ["astronomy", "physics"],
        }
    )
    pq.write_table(table, snap / "all" / "test-00000-of-00001.parquet")
    pq.write_table(table.slice(0, 0), snap / "all" / "dev-00000-of-00001.parquet")
    f = build_filters([{"name": "decontaminate", "benchmarks": ["cais/mmlu"]}], None)[0]
    removal = f.check({"text": "Quiz time: which planet in our solar system has the longest day? Guess!"})
    assert (
        removal is not None
        and removal.value["benchmark"] == "mmlu"
        and removal.value["item"] == "test-00000-of-00001:0"
    )
    with pytest.raises(ConfigError, match=r"openai/gsm8k is not in the local Hugging Face cache.*hf download"):
        build_filters([{"name": "decontaminate", "benchmarks": ["gsm8k"]}], None)
    with pytest.raises(
        ConfigError, match=r"'nosuch\.jsonl': no such file, bundled set or Hub id; bundled sets: .*tiny"
    ):
        build_filters([{"name": "decontaminate", "benchmarks": ["nosuch.jsonl"]}], None)


@pytest.mark.slow
def test_curate_run_with_the_bundled_tiny_set(tmp_path: Path) -> None:
    """Through the CLI: contaminated chats in rejected/ with benchmark, item and n-gram; the rest
    kept; kept + rejected = input; counts per benchmark in stats.json."""
    from forge.stages.curate.decontaminate import known_sets

    tiny = [json.loads(line) for line in Path(known_sets()["tiny"]["path"]).read_text().splitlines()]
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Please help: {tiny[i]['question']}"},
                {"role": "assistant", "content": "Sure."},
            ]
        }
        for i in (0, 2, 4)
    ]
    rows += [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}: how do tides work near the coast?"},
                {"role": "assistant", "content": "The moon pulls the oceans."},
            ]
        }
        for i in range(7)
    ]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    out = tmp_path / "out"
    filters = "+curate.filters=[{name: decontaminate, benchmarks: [tiny], roles: [user]}]"
    proc = forge_cli(["pipeline=curate", f"dataset.name={data}", f"output.dir={out}", filters], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept, rejected = read_rows(out), read_rows(out, "rejected")
    assert len(kept) == 7 and len(rejected) == 3
    values = sorted((json.loads(r["value"]) for r in rejected), key=lambda v: v["item"])
    assert [v["item"] for v in values] == ["tiny-001", "tiny-003", "tiny-005"]
    assert all(v["benchmark"] == "tiny" and len(v["ngram"].split()) == 13 for v in values)
    assert read_stats(out)["filters"]["decontaminate"] == {"contaminated_rows": {"tiny": 3}}


def test_benchmark_columns_any_case_sparse_rows_and_a_missing_column(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FORGE_CACHE", str(tmp_path / "cache"))
    rows = [{"ID": "c-1", "Question": QUESTION, "Answer": "51", "target": 1}, {"ID": "c-2", "Question": None}]
    bench = write_jsonl(tmp_path / "caps.jsonl", rows)
    f = build_filters([{"name": "decontaminate", "benchmarks": [str(bench)]}], None)[0]
    removal = f.check({"text": "Copy: " + QUESTION})
    assert removal is not None and removal.value["item"] == "c-1"
    sparse = {"name": "sparse", "path": str(bench), "columns": ["Question", "Answer"]}  # row 2 has no Answer
    assert build_filters([{"name": "decontaminate", "benchmarks": [sparse]}], None)[0].check({"text": QUESTION})
    with pytest.raises(ConfigError, match=r"no row has the column\(s\) \['Nope'\]"):
        build_filters([{"name": "decontaminate", "benchmarks": [{**sparse, "columns": ["Nope"]}]}], None)
