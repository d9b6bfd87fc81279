import json
import os
import re
import time

import pytest

from forge.schema import ConfigError
from forge.stages.generate.config import Overlong, PromptConfig
from forge.stages.generate.prompt import LengthFitter, RowRejected, build, load_template

TEMPLATE = "Summarize this.\n\n[[DOCUMENT]]\n\nBe brief."


def test_plain_string_becomes_user_message() -> None:
    b = build("hello there", PromptConfig(), None)
    assert b.as_dicts() == [{"role": "user", "content": "hello there"}]


def test_template_wraps_document_and_system_is_prepended() -> None:
    b = build("the doc", PromptConfig(system="Be brief."), TEMPLATE)
    assert b.as_dicts() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Summarize this.\n\nthe doc\n\nBe brief."},
    ]
    assert b.doc_message == 1 and b.doc == "the doc"


def test_messages_list_multi_turn_with_system() -> None:
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "tell me more"}]},
    ]
    b = build(msgs, PromptConfig(system="S"), None)
    assert [m["role"] for m in b.as_dicts()] == ["system", "user", "assistant", "user"]
    assert b.as_dicts()[-1]["content"] == "tell me more"
    assert b.doc_message is None  # conversations are never truncated


def test_row_system_message_is_kept_over_global() -> None:
    msgs = [{"role": "system", "content": "row system"}, {"role": "user", "content": "q"}]
    assert build(msgs, PromptConfig(system="global"), None).as_dicts()[0]["content"] == "row system"


@pytest.mark.parametrize(
    "value, reason",
    [
        (None, "prompt is null"),
        ("", "prompt is empty"),
        ("   \n", "prompt is empty"),
        (42, "prompt has type int"),
        ({"role": "user", "content": "x"}, "prompt has type dict"),
        ([], "messages list is empty"),
        (["just a string"], "messages[0] has type str"),
        ([{"role": "user"}], "messages[0] lacks content"),
        ([{"content": "x"}], "messages[0] lacks role"),
        ([{"role": "bot", "content": "x"}], "messages[0].role 'bot' is not one of"),
        ([{"role": "user", "content": None}], "messages[0].content is null"),
        ([{"role": "user", "content": 5}], "messages[0].content has type int"),
        ([{"role": "system", "content": "x"}], "messages list has no user message"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "ends with an assistant"),
        ([{"role": "user", "content": "  "}], "every user message is empty"),
        ("bad \ud800 surrogate", "prompt holds invalid Unicode"),
        ([{"role": "user", "content": "x\udfff"}], "messages[0].content holds invalid Unicode"),
    ],
)
def test_bad_prompts_are_rejected_with_reason(value, reason: str) -> None:
    with pytest.raises(RowRejected) as info:
        build(value, PromptConfig(), None)
    assert reason in str(info.value)


def test_template_from_file_and_bad_template(tmp_path) -> None:
    path = tmp_path / "t.txt"
    path.write_text(TEMPLATE)
    assert load_template(PromptConfig(template=str(path))) == TEMPLATE
    with pytest.raises(ConfigError, match="prompt.template"):
        load_template(PromptConfig(template="no placeholder here"))
    path.write_text("no placeholder")
    with pytest.raises(ConfigError, match="does not contain"):
        load_template(PromptConfig(template=str(path)))


def test_short_prompts_skip_exact_count(tokenizer) -> None:
    fitter = LengthFitter(tokenizer, 1000, Overlong.truncate)
    built = build("short", PromptConfig(), None)
    fitter.count = None  # the byte bound proves it fits: no tokenization needed
    assert fitter.fit(built) == (built, False)


def test_overlong_document_is_truncated_keeping_instructions(tokenizer) -> None:
    doc = " ".join(["science history math"] * 200)
    built = build(doc, PromptConfig(system="Be brief."), TEMPLATE)
    fitter = LengthFitter(tokenizer, 120, Overlong.truncate)
    assert fitter.count(built) > 120
    fitted, truncated = fitter.fit(built)
    assert truncated
    assert fitter.count(fitted) <= 120
    user = fitted.as_dicts()[1]["content"]
    assert user.startswith("Summarize this.\n\n") and user.endswith("\n\nBe brief.")
    assert fitted.as_dicts()[0]["content"] == "Be brief."
    assert len(fitted.doc) < len(doc) and doc.startswith(fitted.doc)


def test_overlong_skip_and_unfittable(tokenizer) -> None:
    doc = "math " * 500
    with pytest.raises(RowRejected, match="over the budget of 100 .*on_overlong=skip"):
        LengthFitter(tokenizer, 100, Overlong.skip).fit(build(doc, PromptConfig(), None))
    long_template = "instructions " * 200 + "[[DOCUMENT]]"
    with pytest.raises(RowRejected, match="leave no room for the document"):
        LengthFitter(tokenizer, 50, Overlong.truncate).fit(build(doc, PromptConfig(), long_template))
    msgs = [{"role": "user", "content": doc}]
    with pytest.raises(RowRejected, match="messages lists are not truncated"):
        LengthFitter(tokenizer, 100, Overlong.truncate).fit(build(msgs, PromptConfig(), None))


MSGS = [{"role": "system", "content": "row system"}, {"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template", [None, TEMPLATE])
@pytest.mark.parametrize("text", [json.dumps(MSGS), "  " + json.dumps(MSGS, indent=1) + "\n"])
def test_json_string_of_messages_is_parsed_like_a_list(text: str, template: str | None) -> None:
    cfg = PromptConfig(system="global")
    b = build(text, cfg, template)
    assert b == build(MSGS, cfg, template)  # the same conversation, document part and all
    assert b.as_dicts()[0] == {"role": "system", "content": "row system"}
    if template is None:
        assert b.doc_message is None and b.as_dicts()[1]["content"] == "hi"


@pytest.mark.parametrize(
    "text, reason",
    [
        ('[{"role": "bot", "content": "x"}]', "messages[0].role 'bot' is not one of"),
        ('[{"role": "user"}]', "messages[0] lacks content"),
        ('[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]', "ends with an assistant"),
        ('[{"a": 1}, {"b": 2}]', "messages[0] lacks role"),
        ('[{"role": "user", "content": 5}]', "messages[0].content has type int"),
    ],
)
def test_json_string_of_a_bad_messages_list_is_rejected(text: str, reason: str) -> None:
    with pytest.raises(RowRejected) as info:
        build(text, PromptConfig(), None)
    assert "prompt is a JSON string of a list that is not a valid messages list: " in str(info.value)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2]",
        "[]",
        '["a", "b"]',
        '[{"role": "user", "content": "hi"}, 3]',
        "[not json]",
        "[{]",
        "[see below]",
        '[{"role": "user", "content": "hi"}] and more',
        "[" * 100_000 + "]" * 100_000,
    ],
)
def test_other_bracketed_strings_stay_plain_text(text: str) -> None:
    b = build(text, PromptConfig(), None)
    assert b.as_dicts() == [{"role": "user", "content": text}] and b.doc == text


def test_json_string_messages_are_not_truncated(tokenizer) -> None:
    text = json.dumps([{"role": "user", "content": "math " * 500}])
    with pytest.raises(RowRejected, match="messages lists are not truncated"):
        LengthFitter(tokenizer, 100, Overlong.truncate).fit(build(text, PromptConfig(), None))


def test_template_path_problems_name_the_path(tmp_path, monkeypatch) -> None:
    def error(value: str) -> str:
        with pytest.raises(ConfigError) as info:
            load_template(PromptConfig(template=value))
        message = str(info.value)
        assert message.startswith("prompt.template: ") and "\n" not in message
        return message

    assert error("/no/such/file.txt") == "prompt.template: no such file: /no/such/file.txt"
    assert error(str(tmp_path / "missing")) == f"prompt.template: no such file: {tmp_path / 'missing'}"
    monkeypatch.chdir(tmp_path)
    assert error("summary.j2") == "prompt.template: no such file: summary.j2"
    assert error("./summary") == "prompt.template: no such file: summary"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert error("~/t.txt") == f"prompt.template: no such file: {tmp_path / 't.txt'}"
    assert error(str(tmp_path)) == f"prompt.template: {tmp_path} is a directory, not a file"
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 [[DOCUMENT]]")
    assert "latin1.txt is not UTF-8 text" in error(str(tmp_path / "latin1.txt"))
    (tmp_path / "t.txt").write_text(TEMPLATE)
    assert load_template(PromptConfig(template="~/t.txt")) == TEMPLATE
    assert load_template(PromptConfig(template="t.txt")) == TEMPLATE
    # inline text without the placeholder keeps its own message, even with a dot or a slash in it
    for inline in ("Summarize this.", "Answer yes/no.\nBe brief.", "x" * 5000, "", "  "):
        assert "must contain [[DOCUMENT]]" in error(inline)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_template_names_the_path(tmp_path) -> None:
    path = tmp_path / "t.txt"
    path.write_text(TEMPLATE)
    path.chmod(0)
    with pytest.raises(ConfigError, match=f"prompt.template: cannot read {path}: Permission denied"):
        load_template(PromptConfig(template=str(path)))


class CountingTokenizer:
    """Wraps the real tokenizer and records the longest text it was asked to encode."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.has_template = tok.has_template
        self.longest = 0

    def render(self, messages, **kwargs):
        return self.tok.render(messages, **kwargs)

    def encode(self, text: str):
        self.longest = max(self.longest, len(text))
        return self.tok.encode(text)

    def decode(self, ids):
        return self.tok.decode(ids)


def test_huge_document_is_fitted_without_tokenizing_it_whole(tokenizer) -> None:
    doc = "science history math water light energy " * 130_000  # 5.2 MB
    tok = CountingTokenizer(tokenizer)
    fitter = LengthFitter(tok, 2044, Overlong.truncate)
    started = time.monotonic()
    fitted, truncated = fitter.fit(build(doc, PromptConfig(system="Be brief."), TEMPLATE))
    assert time.monotonic() - started < 5
    assert truncated and fitter.count(fitted) <= 2044 and doc.startswith(fitted.doc)
    assert fitted.as_dicts()[1]["content"].endswith("\n\nBe brief.")
    assert tok.longest < 200_000  # a prefix was counted, never the 5 MB
    for on_overlong, value, why in (
        (Overlong.skip, doc, "prompt.on_overlong=skip"),
        (Overlong.truncate, [{"role": "user", "content": doc}], "messages lists are not truncated"),
    ):
        with pytest.raises(RowRejected) as info:
            LengthFitter(tok, 2044, on_overlong).fit(build(value, PromptConfig(), None))
        assert re.fullmatch(
            rf"prompt is at least \d+ tokens \(52000\d\d bytes\), over the budget of 2044 \({why}\)", str(info.value)
        )
    assert tok.longest < 200_000


class XTokenizer:
    """A stand-in whose only tokens are the letter x: long runs of anything else cost nothing."""

    has_template = False

    def render(self, messages, **kwargs):
        return "".join(m["content"] for m in messages)

    def encode(self, text: str):
        return [1] * text.count("x")

    def decode(self, ids):
        return "x" * len(ids)


def test_huge_prompt_counts_exactly_when_its_prefix_fits() -> None:
    fitter = LengthFitter(XTokenizer(), 100, Overlong.skip)
    with pytest.raises(RowRejected, match=r"^prompt is at least 65536 tokens \(100000 bytes\), over the budget"):
        fitter.fit(build("x" * 100_000, PromptConfig(), None))
    # the first 64 K characters hold no token: the prefix grows until the whole prompt is counted
    with pytest.raises(RowRejected, match=r"^prompt is 200 tokens, over the budget of 100"):
        fitter.fit(build(" " * 300_000 + "x" * 200, PromptConfig(), None))
    assert fitter.fit(build(" " * 300_000 + "x" * 50, PromptConfig(), None))[1] is False
