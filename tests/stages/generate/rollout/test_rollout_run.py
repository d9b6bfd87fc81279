"""Rollouts through the real CLI on the real CPU engine: a user's three-step function with a bug
on some rows, resume without re-sending, structured outputs the tiny model cannot satisfy, the
ready rollouts, and a second engine (judge_model) in the same run."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import endpoint_args, forge_cli, read_rows, read_stats, write_jsonl

pytestmark = pytest.mark.slow

USER_MODULE = """
def setup(ctx):
    return {"suffix": ctx.options.get("suffix", "?"), "calls": 0}


async def three_steps(row, generate, ctx):
    ctx.state["calls"] += 1
    draft = await generate(row["prompt"], step="draft")
    assert await ctx.run(len, draft.text) == len(draft.text)  # CPU work in ctx's process pool
    if row["id"].endswith("7"):
        open("/nonexistent/notes.txt")  # an OSError of the user's: the row's, not the run's
    short = await generate(
        [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": draft.text},
         {"role": "user", "content": "Shorter."}],
        step="shorten",
    )
    if row["id"].endswith("3"):
        ratio = len(short.text) / 0  # the deliberate bug
    title = await generate("A title for: " + short["text"], step="title", max_tokens=6, stop="###")
    return {"draft": draft.text, "short": short.text, "title": title.text, "suffix": ctx.state["suffix"],
            "tokens": [draft.completion_tokens, short.completion_tokens, title.completion_tokens]}
"""


def bad_rows(n: int) -> tuple[set[str], int]:
    """The rows USER_MODULE fails (ids ending in 3: after step 2; in 7: after step 1) and the
    requests a whole run sends."""
    bad3 = {f"doc{i}" for i in range(n) if str(i).endswith("3")}
    bad7 = {f"doc{i}" for i in range(n) if str(i).endswith("7")}
    return bad3 | bad7, 3 * (n - len(bad3) - len(bad7)) + 2 * len(bad3) + len(bad7)


def posts(server: dict) -> int:
    return Path(server["log"]).read_text(errors="replace").count('"POST /v1/chat/completions')


def user_project(tmp_path: Path, n: int) -> tuple[Path, Path]:
    project = tmp_path / "project"
    (project / "my_pkg").mkdir(parents=True)
    (project / "my_pkg" / "__init__.py").write_text("")
    (project / "my_pkg" / "rollouts.py").write_text(USER_MODULE)
    data = write_jsonl(project / "d.jsonl", [{"id": f"doc{i}", "prompt": f"write about topic {i}"} for i in range(n)])
    return project, data


def test_user_rollout_bug_quarantines_rows_and_rerun_sends_nothing(tmp_path: Path, cpu_server: dict) -> None:
    project, data = user_project(tmp_path, 20)
    out = tmp_path / "out"
    args = [
        *endpoint_args(cpu_server),
        "rollout.fn=my_pkg.rollouts:three_steps",
        "+rollout.options.suffix=bang",
        f"dataset.name={data}",
        "dataset.id_column=id",
        "generation.max_tokens=12",
        "run.max_in_flight=8",
        f"output.dir={out}",
    ]
    before = posts(cpu_server)
    first = forge_cli(args, project)
    assert first.returncode == 0, first.stderr
    bad, requests = bad_rows(20)
    rows = read_rows(out)
    assert {r["id"] for r in rows} == {f"doc{i}" for i in range(20)} - bad
    assert all(r["suffix"] == "bang" and r["requests"] == 3 and len(r["tokens"]) == 3 for r in rows)
    rejected = read_rows(out, "rejected")
    assert {r["id"] for r in rejected} == bad
    reason = next(r for r in rejected if r["id"] == "doc3")["reason"]
    assert reason.startswith("ZeroDivisionError: division by zero (raised at rollouts.py:")
    assert reason.endswith("in three_steps, step 2 (shorten))"), reason
    assert all(r["stage"] == "rollout" and r["retryable"] for r in rejected)
    assert next(r for r in rejected if r["id"] == "doc3")["step"] == "step 2 (shorten)"
    oserror = next(r for r in rejected if r["id"] == "doc7")
    assert oserror["reason"].startswith(
        "FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/notes.txt'"
    )
    assert oserror["step"] == "step 1 (draft)"
    sent = posts(cpu_server) - before
    assert sent == requests
    stats = read_stats(out)
    assert stats["requests_sent"] == sent and stats["rejected_by_stage"] == {"rollout": len(bad)}

    again = forge_cli(args, project)  # the buggy rows are retried from the cache: nothing is sent
    assert again.returncode == 0, again.stderr
    assert posts(cpu_server) - before == sent
    assert Counter(r["id"] for r in read_rows(out)) == Counter(r["id"] for r in rows)
    assert sorted(r["id"] for r in read_rows(out, "rejected")) == sorted(bad)
    assert read_stats(out)["sessions"][-1]["cache_hits"] == requests - 3 * len(rows)  # only they ran again


def test_json_schema_the_model_cannot_satisfy_quarantines_with_raw_text(tmp_path: Path, cpu_server: dict) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"a question about {i}"} for i in range(5)])
    out = tmp_path / "out"
    before = posts(cpu_server)
    args = [
        *endpoint_args(cpu_server),
        f"dataset.name={data}",
        "generation.json_schema=conf/schema/qa.json",
        "generation.json_retries=1",
        "generation.max_tokens=10",
        f"output.dir={out}",
    ]
    result = forge_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr
    assert posts(cpu_server) - before == 5 * 2  # each row asked twice (1 retry), then quarantined
    rejected = read_rows(out, "rejected")
    assert len(rejected) == 5 and not (out / "data").exists() or not read_rows(out)
    # the raw text of each row's last attempt is kept (greedy decoding may end one row's at once: "")
    assert all(isinstance(x["answer"], str) for x in rejected) and any(x["answer"] for x in rejected)
    r = rejected[0]
    assert r["stage"] == "json_schema" and r["step"] == "step 1 (answer)"
    assert r["reason"].startswith(
        "step 1 (answer): the answer does not match generation.json_schema (conf/schema/qa.json) after 2 attempt(s): "
    )
    assert not r["retryable"]
    assert forge_cli(args, tmp_path).returncode == 0
    assert posts(cpu_server) - before == 10  # quarantined for good: not asked again


def test_ready_rollouts_and_a_second_engine(tmp_path: Path, cpu_server: dict) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"question {i}", "answer": f"answer {i}"} for i in range(4)])
    common = [*endpoint_args(cpu_server), f"dataset.name={data}", "generation.max_tokens=8"]
    # judge on its own engine (judge_model): the main server gets nothing
    before = posts(cpu_server)
    judged = tmp_path / "judged"
    result = forge_cli(
        [
            *common,
            "rollout=judge",
            "rollout.answer_column=answer",
            "rollout.parse_retries=1",
            "judge_model=tiny_cpu",
            f"output.dir={judged}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert posts(cpu_server) == before
    judge_log = (judged / "logs" / "engine_judge_task00000.log").read_text()
    assert judge_log.count('"POST /v1/chat/completions') == 4 * 2
    rejected = read_rows(judged, "rejected")  # a random-weight judge never writes a score
    assert (
        len(rejected) == 4
        and rejected[0]["stage"] == "judge"
        and "no integer score in [1, 10]" in rejected[0]["reason"]
    )

    multi = tmp_path / "multi"
    assert (
        forge_cli([*common, "rollout=multi_turn", "rollout.turns=2", f"output.dir={multi}"], tmp_path).returncode == 0
    )
    rows = read_rows(multi)
    assert len(rows) == 4 and all(
        [m["role"] for m in r["messages"]] == ["user", "assistant", "user", "assistant"] for r in rows
    )
    assert all(r["requests"] == 3 for r in rows)

    best = tmp_path / "best"
    result = forge_cli(
        [*common, "rollout=best_of_n", "rollout.n=2", "rollout.parse_retries=0", f"output.dir={best}"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    rows = read_rows(best)
    assert sorted((r["id"], r["output_index"], r["candidate"]) for r in rows) == [
        (str(i), k, k) for i in range(4) for k in range(2)
    ]
    assert all(r["score"] is None and not r["chosen"] and r["rationale"].startswith("unscored") for r in rows)

    critique = tmp_path / "critique"
    result = forge_cli([*common, "rollout=critique_revise", "rollout.rounds=2", f"output.dir={critique}"], tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_rows(critique)
    assert len(rows) == 4 and all(
        len(r["critiques"]) == 2 and r["text"] == r["revisions"][-1] and r["requests"] == 5 for r in rows
    )

    refine = tmp_path / "refine"
    result = forge_cli([*common, "rollout=self_refine", f"output.dir={refine}"], tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_rows(refine)
    assert len(rows) == 4
    for r in rows:  # one conversation: each step's prompt was the last one's prompt and answer + a turn
        conv = [(m["role"], m["content"]) for m in r["conversation"]]
        assert [role for role, _ in conv] == ["user", "assistant", "user", "assistant", "user", "assistant"]
        assert conv[0] == (r["messages"][0]["role"], r["messages"][0]["content"])
        assert (conv[1][1], conv[3][1], conv[5][1]) == (r["draft"], r["critiques"][0], r["text"])
        assert conv[2][1].startswith("Review your answer above") and r["requests"] == 3


def answered_steps(out_dir: Path) -> list[str]:
    """The steps of a critique_revise run in the order their answers were committed to the request
    cache: "d" for a draft (the shortest prompt), "-" for a later step."""
    import json
    import sqlite3

    with sqlite3.connect(out_dir / "cache" / "task_00000.sqlite") as db:
        prompts = [json.loads(v)["prompt_tokens"] for (v,) in db.execute("SELECT value FROM answers ORDER BY rowid")]
    return ["d" if p == min(prompts) else "-" for p in prompts]


def test_later_steps_get_a_free_engine_slot_first(tmp_path: Path, cpu_server: dict) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"question {i}"} for i in range(3)])
    common = [*endpoint_args(cpu_server), f"dataset.name={data}", "generation.max_tokens=4", "rollout=critique_revise"]
    common += ["run.max_in_flight=1", "rollout.max_active=3"]  # one slot, three samples waiting for it
    orders = {}
    for first in ("true", "false"):
        out = tmp_path / first
        result = forge_cli([*common, f"rollout.later_steps_first={first}", f"output.dir={out}"], tmp_path)
        assert result.returncode == 0, result.stderr
        assert len(read_rows(out)) == 3
        orders[first] = "".join(answered_steps(out))
    assert orders == {"true": "d--d--d--", "false": "ddd------"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rollout.fn=nope_pkg.mod:fn", "rollout.fn: cannot import nope_pkg.mod (ModuleNotFoundError"),
        ("rollout.fn=json:dumps", "rollout.fn: json:dumps must be `async def fn(row, generate, ctx)`"),
        ("rollout.fn=json:nothing", "rollout.fn: json has no 'nothing'"),
        ("rollout.fn=oops", "rollout.fn: 'oops' is not `module:function`"),
        ("rollout.fn=nowhere/r.py:fn", "rollout.fn: cannot import nowhere/r.py (FileNotFoundError: no such file"),
        ("+rollout.columns.x=int", "rollout.columns.x: unknown type 'int'"),
        ("generation.json_schema=missing.json", "generation.json_schema: cannot read missing.json"),
        ("rollout.rounds=0", "rollout.rounds: must be >= 1"),
        ("rollout.timeout_s=0", "rollout.timeout_s: must be > 0 seconds, or null for no limit (got 0.0)"),
        ("rollout.timeout_s=-5", "rollout.timeout_s: must be > 0 seconds, or null for no limit (got -5.0)"),
    ],
)
def test_config_mistakes_are_one_line(tmp_path: Path, override: str, message: str) -> None:
    result = forge_cli([override, f"output.dir={tmp_path / 'out'}"], tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[0].startswith(f"forge: error: {message}"), result.stderr
    assert not (tmp_path / "out").exists()
