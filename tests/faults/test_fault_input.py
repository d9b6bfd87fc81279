"""Fault matrix, input side: the real `forge` CLI against the shared CPU engine, fed broken input.

Each class of bad input either stops the run up front with exit 2 and one line naming the file,
or is quarantined row by row (exit 0) with a reason naming the file and line; a re-run of the same
command then resumes with every row exactly once, in data/ or in rejected/."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import pytest
from checks import assert_exactly_once, error_line, rows_of
from conftest import endpoint_args, forge_cli, write_jsonl

pytestmark = pytest.mark.slow


def _args(server: dict, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        *endpoint_args(server),
        f"dataset.name={data}",
        "dataset.id_column=id",
        "generation.max_tokens=4",
        f"output.dir={out}",
        "output.examples_per_chunk=4",
        *extra,
    ]


def _run_twice(server: dict, data: Path, out: Path, ids: list[str], *extra: str) -> dict[str, dict]:
    """Run, check, run the same command again (it must resume: nothing lost, nothing twice);
    returns the rejected rows by id."""
    for attempt in ("first", "re-run"):
        proc = forge_cli(_args(server, data, out, *extra), cwd=out.parent, timeout=240)
        assert proc.returncode == 0, f"{attempt}: {proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr
        assert_exactly_once(out, ids)
    assert len(rows_of(out)) + len(rows_of(out, "rejected")) == len(ids)
    return {r["id"]: r for r in rows_of(out, "rejected")}


def _user_text(row: dict) -> str:
    return [m["content"] for m in row["messages"] if m["role"] == "user"][-1]


def test_csv_lines_with_extra_or_missing_fields_are_quarantined(tmp_path: Path, cpu_server: dict) -> None:
    data = tmp_path / "d.csv"
    data.write_text('id,prompt\n10,hello 10\n20,hello 20,EXTRA,MORE\n21\n22,"a quoted, prompt"\n')
    out = tmp_path / "out"
    bad = [f"@{data}:line 3", f"@{data}:line 4"]
    rejected = _run_twice(cpu_server, data, out, ["10", "22", *bad])
    assert {r["id"]: _user_text(r) for r in rows_of(out)} == {"10": "hello 10", "22": "a quoted, prompt"}
    assert sorted(rejected) == sorted(bad)
    assert rejected[bad[0]]["stage"] == "input"
    assert rejected[bad[0]]["reason"] == f"{data}:line 3: line has 4 fields; the header has 2"
    assert rejected[bad[1]]["reason"] == f"{data}:line 4: line has 1 field; the header has 2"


def test_json_string_messages_are_parsed_or_quarantined(tmp_path: Path, cpu_server: dict) -> None:
    """A messages list stored as a JSON string, in a CSV cell and in a JSON lines field."""
    folder = tmp_path / "in"
    folder.mkdir()
    convo = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "hi"}]
    cell = json.dumps(convo).replace('"', '""')
    bad_cell = json.dumps([{"role": "bot", "content": "x"}]).replace('"', '""')
    (folder / "a.csv").write_text(f'id,prompt\nc1,"{cell}"\nc2,"{bad_cell}"\nc3,"[1, 2]"\n')
    b = write_jsonl(
        folder / "b.jsonl",
        [
            {"id": "j1", "prompt": json.dumps(convo)},
            {
                "id": "j2",
                "prompt": json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
            },
            {"id": "j3", "prompt": "[see the notes below]"},
        ],
    )
    out = tmp_path / "out"
    rejected = _run_twice(cpu_server, folder, out, ["c1", "c2", "c3", "j1", "j2", "j3"], "prompt.system=Global.")
    rows = {r["id"]: r for r in rows_of(out)}
    assert sorted(rows) == ["c1", "c3", "j1", "j3"]
    for key in ("c1", "j1"):  # the row's own conversation, its system message kept over prompt.system
        assert rows[key]["messages"][:2] == convo, rows[key]["messages"]
    assert _user_text(rows["c3"]) == "[1, 2]" and _user_text(rows["j3"]) == "[see the notes below]"
    assert sorted(rejected) == ["c2", "j2"]
    prefix = "prompt is a JSON string of a list that is not a valid messages list: "
    assert rejected["c2"]["stage"] == "prompt"
    assert rejected["c2"]["reason"].startswith(f"{folder / 'a.csv'}:line 3: {prefix}messages[0].role 'bot'")
    assert rejected["j2"]["reason"] == f"{b}:2: {prefix}messages list ends with an assistant message; nothing to answer"


def test_truncated_jsonl_gz_is_read_up_to_the_break(tmp_path: Path, cpu_server: dict) -> None:
    lines = [json.dumps({"id": f"g{i}", "prompt": f"gzip prompt {i} {i * 7919 % 1000:03x}"}) + "\n" for i in range(40)]
    blob = gzip.compress("".join(lines).encode())
    data = tmp_path / "d.jsonl.gz"
    data.write_bytes(blob[: len(blob) * 6 // 10])
    readable = zlib.decompressobj(wbits=31).decompress(data.read_bytes())  # what survives the cut
    whole = readable.count(b"\n")
    assert 0 < whole < 40
    good = [f"g{i}" for i in range(whole)]
    broken = f"@{data}:{whole + 1}"
    out = tmp_path / "out"
    rejected = _run_twice(cpu_server, data, out, [*good, broken])
    assert sorted(r["id"] for r in rows_of(out)) == sorted(good)  # the cut line is not sent
    assert list(rejected) == [broken]
    reason = rejected[broken]["reason"]
    assert reason.startswith(f"{data}:{whole + 1}: file is truncated or corrupt from this line on (EOFError: ")
    assert reason.endswith("; the rest of the file could not be read")


def test_missing_template_file_stops_with_one_line(tmp_path: Path, cpu_server: dict) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "t1", "prompt": "template test"}])
    out = tmp_path / "out"
    for template, message, runs in (
        ("/no/such/file.txt", "prompt.template: no such file: /no/such/file.txt", 2),  # a re-run says the same
        (str(tmp_path), f"prompt.template: {tmp_path} is a directory, not a file", 1),
    ):
        for _ in range(runs):
            proc = forge_cli(_args(cpu_server, data, out, f"prompt.template={template}"), cwd=tmp_path)
            assert proc.returncode == 2, proc.stderr[-3000:]
            assert error_line(proc.stderr) == f"forge: error: {message}"
            assert not rows_of(out) and not rows_of(out, "rejected")  # stopped before any row was read


def test_duplicate_and_null_ids_are_quarantined(tmp_path: Path, cpu_server: dict) -> None:
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"id": "a", "prompt": "first a"},
            {"id": "b", "prompt": "b"},
            {"id": "a", "prompt": "second a"},
            {"id": None, "prompt": "null id"},
            {"prompt": "no id"},
            {"id": " ", "prompt": "blank id"},
            {"id": "c", "prompt": "c"},
        ],
    )
    out = tmp_path / "out"
    bad = {f"@{data}:{n}": why for n, why in ((3, f"duplicate id 'a' (first at {data}:1)"), (4, "id (id) is missing"))}
    bad |= {f"@{data}:{n}": "id (id) is missing" for n in (5, 6)}
    rejected = _run_twice(cpu_server, data, out, ["a", "b", "c", *bad])
    assert {r["id"]: _user_text(r) for r in rows_of(out)} == {"a": "first a", "b": "b", "c": "c"}
    assert sorted(rejected) == sorted(bad)
    for key, why in bad.items():
        assert rejected[key]["stage"] == "input" and rejected[key]["reason"] == f"{key[1:]}: {why}"


@pytest.mark.parametrize("on_overlong", ["truncate", "skip"])
def test_5mb_prompt_is_truncated_or_quarantined(tmp_path: Path, cpu_server: dict, on_overlong: str) -> None:
    big = "science history math water light energy " * 128_000  # 5.1 MB
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "small", "prompt": "a short one"}, {"id": "big", "prompt": big}])
    out = tmp_path / "out"
    rejected = _run_twice(cpu_server, data, out, ["small", "big"], f"prompt.on_overlong={on_overlong}")
    rows = {r["id"]: r for r in rows_of(out)}
    if on_overlong == "truncate":
        assert sorted(rows) == ["big", "small"] and rows["big"]["truncated"] and not rows["small"]["truncated"]
        assert big.startswith(_user_text(rows["big"])) and 0 < rows["big"]["prompt_tokens"] <= 2048 - 4
    else:
        assert sorted(rows) == ["small"] and list(rejected) == ["big"]
        reason = rejected["big"]["reason"]
        assert reason.startswith(f"{data}:2: prompt is at least ") and f"({len(big)} bytes)" in reason
        assert reason.endswith("over the budget of 2044 (prompt.on_overlong=skip)")
