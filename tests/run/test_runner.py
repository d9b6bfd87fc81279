"""End to end through the real CLI, the real CPU engine and real Parquet files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import endpoint_args, forge_cli, read_rows, read_stats, write_jsonl

MESSY = [
    {"id": "a", "prompt": "plain string prompt"},
    {
        "id": "b",
        "prompt": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "and then?"},
        ],
    },
    {"id": "c", "prompt": None},
    {"id": "d", "prompt": ""},
    {"id": "e", "prompt": 12},
    {"id": "f", "prompt": [{"role": "wizard", "content": "x"}]},
    {"id": "g", "prompt": {"text": "a dict"}},
    {"id": "a", "prompt": "duplicate id"},
    {"prompt": "no id at all"},
    {"id": "h", "prompt": "another good one", "topic": "t1"},
    {"id": "j", "prompt": "scraped text with a lone surrogate \ud800 in it"},
]


def _messy_file(tmp_path: Path) -> Path:
    path = write_jsonl(tmp_path / "messy.jsonl", MESSY)
    with open(path, "a") as fh:
        fh.write("{this is not json\n")  # line 12
        fh.write(json.dumps({"id": "i", "prompt": "last good"}) + "\n")
    return path


def test_prompt_formats_and_every_bad_row_quarantined(tmp_path: Path, cpu_server: dict) -> None:
    data = _messy_file(tmp_path)
    out = tmp_path / "out"
    proc = forge_cli(
        [
            *endpoint_args(cpu_server),
            f"dataset.name={data}",
            "dataset.id_column=id",
            "dataset.keep_columns=[topic]",
            "prompt.system=Be brief.",
            "generation.max_tokens=8",
            f"output.dir={out}",
            "output.examples_per_chunk=2",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["id"]: r for r in read_rows(out)}
    assert sorted(rows) == ["a", "b", "h", "i"]
    assert rows["a"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "plain string prompt"},
    ]
    assert [m["role"] for m in rows["b"]["messages"]] == ["system", "user", "assistant", "user"]
    assert json.loads(rows["h"]["metadata"]) == {"topic": "t1"}
    for r in rows.values():
        assert r["completion_tokens"] > 0 and r["prompt_tokens"] > 0 and r["engine"] == "endpoint"
        assert r["length_stopped"] == (r["finish_reason"] == "length")
    rejected = {r["id"]: r for r in read_rows(out, "rejected")}
    reasons = {k: r["reason"] for k, r in rejected.items()}
    assert "prompt is null" in reasons["c"] and "prompt is empty" in reasons["d"]
    assert "prompt has type int" in reasons["e"] and "'wizard' is not one of" in reasons["f"]
    assert "prompt has type dict" in reasons["g"]
    dup = next(r for k, r in rejected.items() if "duplicate id 'a'" in r["reason"])
    assert dup["id"].startswith("@") and "messy.jsonl:8" in dup["source"]
    assert any("id (id) is missing" in r for r in reasons.values())
    assert any("messy.jsonl:12" in r and "not valid JSON" in r for r in reasons.values())
    assert "prompt holds invalid Unicode" in reasons["j"] and "\\ud800" in rejected["j"]["prompt"]
    stats = read_stats(out)
    assert stats["documents_in"] == 13
    assert stats["documents_written"] == 4 and stats["documents_rejected"] == 9
    assert stats["rejected_by_stage"] == {"prompt": 6, "input": 3}
    assert len(list((out / "data").glob("*.parquet"))) == 2  # 4 rows, 2 per chunk


def test_engine_400_422_quarantine_rows_and_run_goes_on(tmp_path: Path, cpu_server: dict) -> None:
    """The real CPU engine answers 422 to top_k: every row is quarantined with its message."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}"} for i in range(5)])
    out = tmp_path / "out"
    args = [
        *endpoint_args(cpu_server),
        f"dataset.name={data}",
        "generation.top_k=5",
        "generation.max_tokens=4",
        f"output.dir={out}",
    ]
    proc = forge_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rejected = read_rows(out, "rejected")
    assert len(rejected) == 5 and not read_rows(out)
    assert all("HTTP 422" in r["reason"] and "top_k" in r["reason"] for r in rejected)
    # refused before the engine answered anything (it may be the config's fault, as here): the
    # rows stay retryable, a re-run sends them again, and rejected/ still holds each once
    assert all(r["retryable"] for r in rejected)
    proc = forge_cli(args, cwd=tmp_path)
    assert proc.returncode == 0 and len(read_rows(out, "rejected")) == 5
    assert read_stats(out)["sessions"][-1]["requests_sent"] == 5


def test_truncation_keeps_template_and_fits_budget(tmp_path: Path, cpu_server: dict) -> None:
    long_doc = " ".join(["science history math water light"] * 150)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": long_doc}, {"prompt": "short one"}])
    out = tmp_path / "out"
    args = [
        *endpoint_args(cpu_server),
        "model.max_model_len=300",
        f"dataset.name={data}",
        "prompt=summarize",
        "generation.max_tokens=8",
        f"output.dir={out}",
    ]
    proc = forge_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {r["id"]: r for r in read_rows(out)}
    assert rows["0"]["truncated"] and not rows["1"]["truncated"]
    assert rows["0"]["prompt_tokens"] <= 300 - 8
    user = rows["0"]["messages"][1]["content"]
    assert user.startswith("Summarize the following document") and len(user) < len(long_doc)
    assert read_stats(out)["truncated_rows"] == 1
    skipped = tmp_path / "skipped"
    proc = forge_cli([*args[:-1], f"output.dir={skipped}", "prompt.on_overlong=skip"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [r["id"] for r in read_rows(skipped)] == ["1"]
    assert "over the budget of 292" in read_rows(skipped, "rejected")[0]["reason"]


def test_rollouts_resume_and_cache_replay(tmp_path: Path, cpu_server: dict) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"question {i}"} for i in range(6)])
    out = tmp_path / "out"
    args = [
        *endpoint_args(cpu_server),
        f"dataset.name={data}",
        "generation.rollouts=3",
        "generation.seed=11",
        "generation.max_tokens=6",
        f"output.dir={out}",
        "output.examples_per_chunk=4",
    ]
    assert forge_cli(args, cwd=tmp_path).returncode == 0
    rows = read_rows(out)
    assert sorted((r["id"], r["rollout"]) for r in rows) == [(str(i), k) for i in range(6) for k in range(3)]
    assert read_stats(out)["sessions"][-1]["requests_sent"] == 18
    # same command again: nothing to do, nothing sent
    assert forge_cli(args, cwd=tmp_path).returncode == 0
    assert read_stats(out)["sessions"][-1]["requests_sent"] == 0 and len(read_rows(out)) == 18
    # shards lost after the answers were cached (as if killed before writing): replayed, not re-sent
    for f in sorted((out / "data").glob("*.parquet"))[1:]:
        f.unlink()
    assert forge_cli(args, cwd=tmp_path).returncode == 0
    last = read_stats(out)["sessions"][-1]
    assert last["requests_sent"] == 0 and last["cache_hits"] == 14
    assert sorted((r["id"], r["rollout"]) for r in read_rows(out)) == [(str(i), k) for i in range(6) for k in range(3)]
    assert read_stats(out)["rows_written"] == 18  # totals come from the shards: no double counting


def test_changed_input_or_settings_stop_or_start_fresh(tmp_path: Path, cpu_server: dict) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"question {i}"} for i in range(4)])
    out = tmp_path / "out"
    args = [*endpoint_args(cpu_server), f"dataset.name={data}", "generation.max_tokens=5", f"output.dir={out}"]
    assert forge_cli(args, cwd=tmp_path).returncode == 0
    proc = forge_cli([*args, "generation.temperature=0.7"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "generation.params.temperature: None -> 0.7" in proc.stderr and "output.on_change=fresh" in proc.stderr
    write_jsonl(data, [{"prompt": f"question {i}"} for i in range(3)] + [{"prompt": "changed"}])
    proc = forge_cli(args, cwd=tmp_path)
    assert proc.returncode == 2 and "input of task 0 changed" in proc.stderr
    assert len(read_rows(out)) == 4  # nothing lost
    proc = forge_cli([*args, "output.on_change=fresh"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {r["messages"][-1]["content"] for r in read_rows(out)} >= {"changed"}
    assert len(read_rows(out)) == 4
    assert read_stats(out)["sessions"][-1]["cache_hits"] == 3  # unchanged rows replayed
    assert list((out / ".stale").glob("*/data/*.parquet"))


def test_secrets_never_reach_files(tmp_path: Path, cpu_server: dict) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q"}])
    out = tmp_path / "out"
    secret, hf = "sk-forgeTESTsecretVALUE0123456789", "hf_forgeTESTtokenVALUE0123456789abc"
    args = [
        *endpoint_args(cpu_server)[:-2],
        "model.api_key_env=FORGE_TEST_API_KEY",
        "model.max_model_len=2048",
        f"dataset.name={data}",
        "generation.max_tokens=4",
        f"output.dir={out}",
        f"+generation.extra_body.note=token {hf}",
    ]
    proc = forge_cli(args, cwd=tmp_path, env={"FORGE_TEST_API_KEY": secret, "HF_TOKEN": hf})
    assert proc.returncode == 0, proc.stderr
    for path in out.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert secret.encode() not in blob and hf.encode() not in blob, path
    assert secret not in proc.stdout + proc.stderr and hf not in proc.stdout + proc.stderr
    assert "FORGE_TEST_API_KEY" in (out / "config.yaml").read_text()  # the NAME is kept


def test_engine_start_failure_is_clear(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = forge_cli(
        [f"output.dir={out}", f"model.name_or_path={tmp_path}/no-model", "model.startup_timeout_s=60"], cwd=tmp_path
    )
    assert proc.returncode == 1
    assert "engine exited with code" in proc.stderr and "engine_task00000.log" in proc.stderr


def test_local_tasks_run_in_sequence_lose_nothing(tmp_path: Path, cpu_server: dict) -> None:
    """datatrove's runner loses data running ranks in sequence; forge keeps state per task."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"question {i}"} for i in range(10)])
    out = tmp_path / "out"
    args = [
        *endpoint_args(cpu_server),
        f"dataset.name={data}",
        "generation.max_tokens=4",
        f"output.dir={out}",
        "cluster.tasks=3",
        "output.examples_per_chunk=2",
    ]
    assert forge_cli(args, cwd=tmp_path).returncode == 0
    assert sorted(int(r["id"]) for r in read_rows(out)) == list(range(10))
    assert {p.name[:5] for p in (out / "data").glob("*.parquet")} == {"00000", "00001", "00002"}
    stats = read_stats(out)
    assert stats["tasks"] == 3 and stats["documents_in"] == 10 and stats["rows_written"] == 10
    # one task re-run alone: nothing to do
    assert forge_cli([*args, "cluster.task_index=1"], cwd=tmp_path).returncode == 0
    assert len(read_rows(out)) == 10


def test_reordered_input_with_ids_resumes_without_resending(tmp_path: Path, cpu_server: dict) -> None:
    rows = [{"id": f"k{i}", "prompt": f"question {i}"} for i in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    args = [
        *endpoint_args(cpu_server),
        f"dataset.name={data}",
        "dataset.id_column=id",
        "generation.max_tokens=4",
        f"output.dir={out}",
    ]
    assert forge_cli(args, cwd=tmp_path).returncode == 0
    write_jsonl(data, list(reversed(rows)))
    proc = forge_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert read_stats(out)["sessions"][-1]["requests_sent"] == 0 and len(read_rows(out)) == 8


def test_offline_hub_dataset_error_is_clear(tmp_path: Path) -> None:
    proc = forge_cli(
        ["dataset.name=nobody/no-such-dataset", f"output.dir={tmp_path / 'out'}"],
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert "forge: error: dataset.name: cannot load 'nobody/no-such-dataset'" in proc.stderr


def test_a_second_process_on_the_same_shard_is_refused(tmp_path: Path) -> None:
    from forge.run.locks import RunBusy, shard_lock

    with shard_lock(tmp_path, 3):
        with pytest.raises(RunBusy, match=r"shard 3 .* is being run right now by pid \d+"):
            with shard_lock(tmp_path, 3):
                pass
        with shard_lock(tmp_path, 4):  # other shards are free
            pass
    with shard_lock(tmp_path, 3):  # released on exit
        pass
