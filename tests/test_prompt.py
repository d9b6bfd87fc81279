import pytest

from forge.config import ConfigError, Overlong, PromptConfig
from forge.prompt import LengthFitter, RowRejected, build, load_template

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
