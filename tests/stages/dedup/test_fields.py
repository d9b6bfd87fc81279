"""dedup.field: one normalized text per row, whatever shape the row has."""

from __future__ import annotations

import pytest

from forge.stages.dedup.fields import FieldError, field_text

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is  2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}


def test_fields_of_a_chat_row() -> None:
    assert field_text(CHAT, "messages.user") == field_text(
        {"messages": [{"role": "user", "content": "WHAT IS 2+2?"}]}, "messages.user"
    )
    assert field_text(CHAT, "messages.assistant") == "4"
    assert field_text(CHAT, "text") == field_text(CHAT, "messages")  # no text column: the conversation
    assert field_text(CHAT, "messages") != field_text({**CHAT, "messages": CHAT["messages"][1:]}, "messages")


def test_text_rows_and_columns() -> None:
    assert field_text({"text": "Ｈｅｌｌｏ  world"}, "text") == "hello world"
    assert field_text({"prompt": "A", "messages": CHAT["messages"], "text": "4"}, "text") == "4"  # a generation row
    assert field_text({"q": {"b": 1, "a": 2}}, "q") == field_text({"q": {"a": 2, "b": 1}}, "q")
    with pytest.raises(FieldError, match=r"^dedup.field: the row has no 'nope'"):
        field_text({"text": "x"}, "nope")


def test_messages_as_json_text_and_content_parts() -> None:
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}]}
    as_json = {"messages": '[{"role": "user", "content": "what is 2+2?"}]'}
    assert (
        field_text(parts, "messages.user") == field_text(as_json, "messages.user") == field_text(CHAT, "messages.user")
    )
