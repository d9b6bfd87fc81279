"""forge/stages/curate/filters.py (+ chat_filters.py, langid.py): each filter keeps a good row and removes a
planted bad one with the right reason and value; config mistakes name the entry. Offline, fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forge.schema import ConfigError
from forge.stages.curate.filters import FILTERS, RowFilter, build_filters
from forge.stages.curate.rows import Removal, content_id

GOOD = (
    "The river runs through the old city and past the market, where people have traded grain and cloth "
    "for many hundreds of years. In the spring the water rises with the melting snow from the mountains, "
    "and the farmers along the banks plant their fields as soon as it falls again.\n\n"
    "Historians who study the region have found records of floods that changed the course of the river "
    "more than once. Each time the town moved its docks to follow the water, and the new streets were "
    "built on the dry land that the old channel left behind.\n\n"
    "Today the museum near the bridge keeps maps of every channel, with the dates of each flood and the "
    "names of the families that lived beside it. Visitors can walk the old banks and read the stones "
    "that mark where the water once reached."
)
FRENCH = (
    "La rivière traverse la vieille ville et passe devant le marché, où les habitants échangent du grain "
    "et du tissu depuis des siècles. Au printemps, l'eau monte avec la fonte des neiges des montagnes."
)
GERMAN = (
    "Der Fluss fließt durch die alte Stadt und am Markt vorbei, wo die Menschen seit Jahrhunderten Getreide "
    "und Stoff handeln. Im Frühling steigt das Wasser mit der Schneeschmelze aus den Bergen."
)


def doc(text: str) -> dict:
    return {"id": content_id(None, text), "messages": None, "text": text, "num_turns": 0}


def chat(*turns: tuple, **kw) -> dict:
    messages = []
    for t in turns:
        role, content = t[0], t[1]
        calls = t[2] if len(t) > 2 else None
        messages.append({"role": role, "content": content, "reasoning": None, "tool_calls": calls})
    return {"id": content_id(messages, None), "messages": messages, "text": None, "num_turns": len(messages), **kw}


def one(entry: dict, tokenizer: str | None = None) -> RowFilter:
    (f,) = build_filters([entry], tokenizer)
    return f


def removed(f: RowFilter, row: dict) -> tuple[str, object]:
    r = f.check(row)
    assert isinstance(r, Removal), f"{f.name} kept a row it should remove"
    assert r.filter == f.name
    json.dumps(r.value)  # what rejected/ stores must serialize
    return r.reason, r.value


# --- datatrove blocks ---------------------------------------------------------------------------------


def test_gopher_quality_keeps_prose_and_measures_what_failed() -> None:
    f = one({"name": "gopher_quality"})
    assert f.applies_to == "documents"
    assert f.check(doc(GOOD)) is None
    assert removed(f, doc("far too short a document")) == ("gopher_short_doc", 5)
    hashes = " ".join(["#tag word the and of"] * 20)
    reason, value = removed(f, doc(hashes))
    assert reason == "gopher_too_many_hashes" and value == pytest.approx(20 / 120, abs=1e-3)
    no_stop = " ".join(f"word{i % 7} alpha beta gamma delta" for i in range(20))
    assert removed(f, doc(no_stop)) == ("gopher_enough_stop_words", 0)
    assert removed(one({"name": "gopher_quality", "min_doc_words": 500}), doc(GOOD))[0] == "gopher_short_doc"


def test_gopher_repetition_and_fineweb_quality() -> None:
    rep = one({"name": "gopher_repetition"})
    assert rep.check(doc(GOOD)) is None
    reason, value = removed(rep, doc("\n\n".join(["the same paragraph again and again."] * 6)))
    assert reason == "dup_para_frac" and value == pytest.approx(5 / 6, abs=1e-3)

    fw = one({"name": "fineweb_quality"})
    assert fw.check(doc(GOOD)) is None
    lines = "\n".join(f"menu item number {i} of the site" for i in range(30))  # no line ends a sentence
    assert removed(fw, doc(lines)) == ("line_punct_ratio", 0.0)


def test_c4_quality_does_not_change_the_text_the_next_filter_sees() -> None:
    c4, gq = build_filters([{"name": "c4_quality", "min_num_sentences": 2}, {"name": "gopher_quality"}], None)
    row = doc(GOOD + "\nshort line without a stop")
    assert c4.check(row) is None  # C4 rewrites its Document's text when it keeps a row ...
    assert gq.block.filter is not None and gq.check(row) is None  # ... the shared Document is restored
    assert row["text"].endswith("without a stop")
    assert removed(c4, doc(GOOD + "\nSome code { here } in a line.")) == ("curly_bracket", "{")


def test_regex_and_keywords() -> None:
    rx = one({"name": "regex", "regex_exp": r"lorem\s+ipsum"})
    assert rx.check(doc(GOOD)) is None
    assert removed(rx, doc("Some lorem  ipsum filler")) == ("regex", "lorem  ipsum")

    kw = one({"name": "keywords", "words": ["as an AI language model", "casino"]})
    assert kw.check(doc(GOOD)) is None
    assert kw.check(doc("the casinos of the town")) is None  # whole words only
    assert removed(kw, doc("Well, As an AI Language Model, I cannot")) == ("keyword", "as an ai language model")
    assert removed(one({"name": "keywords", "words": ["casino"], "whole_word": False}), doc("casinos"))[1] == "casino"


def test_document_filters_see_a_chats_turns_when_applied_to_all() -> None:
    f = one({"name": "keywords", "words": ["forbidden"], "applies_to": "all", "label": "kw_all"})
    assert f.name == "kw_all" and f.applies_to == "all"
    assert removed(f, chat(("user", "say it"), ("assistant", "the forbidden word"))) == ("keyword", "forbidden")
    assert f.wants(chat(("user", "q"), ("assistant", "a"))) and f.wants(doc("x"))
    assert one({"name": "gopher_quality"}).wants(doc("x")) and not one({"name": "gopher_quality"}).wants(chat())


def test_length() -> None:
    f = one({"name": "length", "min_chars": 10, "max_chars": 100})
    assert f.check(doc("just right, really")) is None
    assert removed(f, doc("short")) == ("too_short", 5)
    assert removed(f, chat(("user", "x" * 60), ("assistant", "y" * 60))) == ("too_long", 122)


# --- chat structure ------------------------------------------------------------------------------------


def test_chat_structure() -> None:
    f = one({"name": "chat_structure"})
    assert f.applies_to == "chats"
    calls = json.dumps([{"name": "search", "arguments": {"q": "x"}}])
    good = chat(("system", "be brief"), ("user", "q"), ("assistant", "", calls), ("tool", "r"), ("assistant", "a"))
    assert f.check(good) is None
    assert f.check(chat(("user", "q"), ("assistant", "a"), ("user", "thanks"))) is None
    assert removed(f, chat(("user", "q"))) == ("no_assistant_turn", 1)
    assert removed(f, chat(("user", "q"), ("assistant", "  "))) == ("empty_assistant_turn", 1)
    assert removed(f, chat(("user", "q"), ("assistant", "", "[]"))) == ("empty_assistant_turn", 1)
    assert removed(f, chat(("user", "q"), ("system", "s"), ("assistant", "a"))) == (
        "wrong_role_order",
        "1:user->system",
    )
    assert removed(f, chat(("user", "q"), ("user", "q2"), ("assistant", "a"))) == ("wrong_role_order", "1:user->user")
    assert removed(f, chat(("assistant", "hi"), ("user", "q"))) == ("wrong_role_order", "0:start->assistant")
    assert removed(f, chat(("user", "q"), ("assistant", "a"), ("tool", "r"))) == (
        "wrong_role_order",
        "2:assistant->tool",
    )
    assert removed(f, chat(("user", "q"), ("assistant", "", calls), ("user", "q"))) == (
        "wrong_role_order",
        "2:assistant+tools->user",
    )
    strict = one({"name": "chat_structure", "require_last_assistant": True})
    assert strict.check(good) is None
    assert removed(strict, chat(("user", "q"), ("assistant", "a"), ("user", "more"))) == (
        "last_turn_not_assistant",
        "user",
    )
    assert f.check(doc(GOOD)) is None  # not a chat: nothing to say


def test_max_turns() -> None:
    f = one({"name": "max_turns", "max": 3})
    assert f.check(chat(("user", "q"), ("assistant", "a"))) is None
    assert removed(f, chat(("user", "q"), ("assistant", "a")) | {"messages": [{"role": "user"}] * 4}) == (
        "too_many_turns",
        4,
    )
    assert removed(one({"name": "max_turns", "min": 3}), chat(("user", "q"), ("assistant", "a"))) == (
        "too_few_turns",
        2,
    )


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    from forge.engine.tiny_model import build_tokenizer

    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    return str(path)


def test_role_tokens(tiny_tokenizer: str) -> None:
    from forge.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer)
    answer = "the water cycle: water evaporates, forms clouds and falls as rain again"
    n = len(tok.encode(answer))
    f = one({"name": "role_tokens", "assistant": {"min": 1, "max": n}, "user": {"max": 8}}, tiny_tokenizer)
    assert f.check(chat(("user", "why rain"), ("assistant", answer))) is None
    assert removed(f, chat(("user", "why rain"), ("assistant", answer + " and again"))) == (
        "assistant_too_long",
        len(tok.encode(answer + " and again")),
    )
    assert removed(f, chat(("user", "why rain"), ("assistant", "", None))) == ("assistant_too_short", 0)
    long_q = "please explain the water cycle in three short steps for a student"
    assert removed(f, chat(("user", long_q), ("assistant", "ok"))) == ("user_too_long", len(tok.encode(long_q)))


# --- language ------------------------------------------------------------------------------------------


def test_language_id_is_offline_and_calibrated() -> None:
    f = one({"name": "language", "languages": ["en"], "min_score": 0.65})
    assert f.applies_to == "all"
    assert f.check(doc(GOOD)) is None
    assert f.check(chat(("user", "What is the capital of France?"), ("assistant", "The capital is Paris."))) is None
    for text, lang in ((FRENCH, "fr"), (GERMAN, "de")):
        reason, value = removed(f, doc(text))
        code, score = value.split(":")
        assert (reason, code) == ("wrong_language", lang) and 0.65 < float(score) <= 1.0
    reason, value = removed(f, doc("ok 123"))
    assert reason in ("low_language_score", "wrong_language")
    both = one({"name": "language", "languages": ["en", "fr"]})
    assert both.check(doc(FRENCH)) is None and both.check(doc(GOOD)) is None
    reason, value = removed(one({"name": "language", "min_score": 0.9}), doc("Is this English?"))
    assert reason == "low_language_score" and value.startswith("en:0.")


# --- configuration mistakes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            [{"name": "length", "min_chars": 1}, {"name": "length", "label": "l2"}, {"name": "gopher_qualty"}],
            "curate.filters[2]: unknown filter 'gopher_qualty' (did you mean 'gopher_quality'?); known: c4_quality",
        ),
        (
            [{"name": "gopher_quality", "min_doc_word": 10}],
            "curate.filters[0] (gopher_quality): unknown option 'min_doc_word' (did you mean 'min_doc_words'?); "
            "options: min_doc_words, max_doc_words,",
        ),
        ([{"name": "gopher_quality", "exclusion_writer": None}], "unknown option 'exclusion_writer'"),
        ([{"name": "gopher_quality", "min_doc_words": "fifty"}], "option 'min_doc_words' must be a number"),
        ([{"name": "c4_quality", "filter_javascript": "no"}], "option 'filter_javascript' must be true or false"),
        ([{"name": "regex"}], "curate.filters[0] (regex): missing option 'regex_exp'"),
        ([{"name": "regex", "regex_exp": "("}], "curate.filters[0] (regex): missing ), unterminated subpattern"),
        ([{"name": "keywords", "words": []}], "curate.filters[0] (keywords): words: give at least one"),
        ([{"name": "max_turns"}], "curate.filters[0] (max_turns): set `max`"),
        ([{"name": "language", "languages": ["english"]}], "(language): languages: unknown code 'english'"),
        ([{"name": "length", "applies_to": "rows"}], "(length): applies_to must be one of documents, chats, all"),
        ([{"name": "length"}, {"name": "length"}], "curate.filters[1] (length): the name 'length' is already used"),
        ([{"min_chars": 3}], "curate.filters[0]: must be a mapping with a `name`"),
        (
            [{"name": "role_tokens", "assistant": {"max": 10}}],
            "curate.filters[0] (role_tokens): needs a tokenizer to count tokens; set curate.tokenizer",
        ),
    ],
)
def test_config_mistakes_name_the_entry(entries: list, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_filters(entries, None)
    assert message in str(e.value)


def test_role_tokens_options_are_checked(tiny_tokenizer: str) -> None:
    with pytest.raises(ConfigError, match=r"\(role_tokens\): unknown option 'assistent'.*options: system, user"):
        build_filters([{"name": "role_tokens", "assistent": {"max": 1}}], tiny_tokenizer)
    with pytest.raises(ConfigError, match=r"\(role_tokens\): assistant.max: must be a non-negative integer"):
        build_filters([{"name": "role_tokens", "assistant": {"max": "many"}}], tiny_tokenizer)
    with pytest.raises(ConfigError, match=r"\(role_tokens\): user: unknown key 'maximum'"):
        build_filters([{"name": "role_tokens", "user": {"maximum": 1}}], tiny_tokenizer)


def test_labels_let_a_filter_appear_twice_and_omegaconf_entries_work() -> None:
    from omegaconf import OmegaConf

    entries = OmegaConf.create(
        [{"name": "length", "max_chars": 10, "applies_to": "chats"}, {"name": "length", "min_chars": 5, "label": "min"}]
    )
    a, b = build_filters(entries, None, key="x.filters")
    assert (a.name, a.applies_to, b.name, b.applies_to) == ("length", "chats", "min", "all")
    with pytest.raises(ConfigError, match=r"^x\.filters\[0\]: unknown filter"):
        build_filters([{"name": "nope"}], None, key="x.filters")


def test_every_registered_filter_builds_with_its_defaults(tiny_tokenizer: str) -> None:
    required = {"regex": {"regex_exp": "x"}, "keywords": {"words": ["x"]}, "max_turns": {"max": 9}}
    required["role_tokens"] = {"assistant": {"max": 9}}
    required["decontaminate"] = {"benchmarks": ["tiny"]}
    for name in FILTERS:
        f = one({"name": name, **required.get(name, {})}, tiny_tokenizer)
        assert f.name == name and f.applies_to in ("documents", "chats", "all")
        assert f.check(doc(GOOD)) in (None,) or isinstance(f.check(doc(GOOD)), Removal)


def test_the_shared_document_follows_the_row(tmp_path: Path) -> None:
    """Rows are checked one after another by several filters; a new row (even one equal to the
    last) never sees the previous row's Document."""
    gq = one({"name": "gopher_quality"})
    good, bad = doc(GOOD), doc("short one")
    assert gq.check(good) is None and gq.check(bad) is not None and gq.check(good) is None
    good["text"] = "now short"  # the same dict, its text replaced
    assert removed(gq, good) == ("gopher_short_doc", 2)
