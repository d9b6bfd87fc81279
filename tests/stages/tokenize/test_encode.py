"""forge/stages/tokenize/encode.py: the loss mask of chats, token by token, under templates without
`{% generation %}`: ChatML (the tiny model's) and a Qwen3-like one that drops the reasoning of past
turns and renders tool calls; documents; quarantine reasons; tokenizers that cannot load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import qwen_like_template

from forge.stages.tokenize.config import TokenizeConfig
from forge.stages.tokenize.encode import DroppedContent, Encoder, RowError, TokenizerError

QWEN_LIKE = qwen_like_template()  # Qwen3's behaviour, shortened (tests/conftest.py)


@pytest.fixture(scope="module")
def qwen_like(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = QWEN_LIKE
    out = tmp_path_factory.mktemp("qwen_like")
    tok.save_pretrained(out)
    return out


def _masked_text(enc: Encoder, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    """The text of each run of masked tokens."""
    runs, current = [], []
    for t, m in zip(tokens.tolist(), mask.tolist(), strict=True):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [enc.hf.decode(r) for r in runs]


def test_chatml_masks_each_assistant_turn_and_its_end_marker(tiny_model: Path) -> None:
    enc = Encoder(str(tiny_model), TokenizeConfig())
    chat = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is water"},
        {"role": "assistant", "content": "a liquid"},
        {"role": "user", "content": "and light"},
        {"role": "assistant", "content": "energy, fast"},
    ]
    [out] = enc.chats([chat])
    assert _masked_text(enc, out.tokens, out.mask) == ["a liquid<|im_end|>", "energy, fast<|im_end|>"]
    assert out.tokens[-1] == enc.eos and out.mask[-1] == 0  # the document separator is not trained on
    [last] = Encoder(str(tiny_model), TokenizeConfig(mask="last")).chats([chat])
    assert _masked_text(enc, last.tokens, last.mask) == ["energy, fast<|im_end|>"]
    [every] = Encoder(str(tiny_model), TokenizeConfig(mask="all")).chats([chat])
    assert every.mask[:-1].all()


def _agent_chat() -> list[dict]:
    return [
        {"role": "user", "content": "plan a trip"},
        {"role": "assistant", "content": "first the weather", "reasoning": "check the sky"},
        {"role": "user", "content": "ok go"},
        {
            "role": "assistant",
            "content": "calling the tool",
            "reasoning": "need data",
            "tool_calls": '[{"name": "weather", "arguments": {"city": "Paris"}}]',
        },
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "it is sunny", "reasoning": "the tool said so"},
    ]


def test_a_template_that_drops_past_reasoning_and_renders_tool_calls(qwen_like: Path) -> None:
    enc = Encoder(str(qwen_like), TokenizeConfig())
    [out] = enc.chats([_agent_chat()])
    call = '\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert _masked_text(enc, out.tokens, out.mask) == [
        "first the weather<|im_end|>",  # its reasoning is not rendered any more: nothing to mask
        "<think>\nneed data\n</think>\n\ncalling the tool" + call + "<|im_end|>",
        "<think>\nthe tool said so\n</think>\n\nit is sunny<|im_end|>",
    ]
    no_reasoning = Encoder(str(qwen_like), TokenizeConfig(reasoning=False))
    [out] = no_reasoning.chats([_agent_chat()])
    assert _masked_text(enc, out.tokens, out.mask) == [
        "first the weather<|im_end|>",
        "calling the tool" + call + "<|im_end|>",
        "it is sunny<|im_end|>",
    ]


def test_an_agent_trace_whose_early_turns_lose_their_reasoning(qwen_like: Path) -> None:
    """A tool-call-only turn and an answer before the last user turn: the template drops their
    reasoning from the whole chat, so they are found there without it."""
    call = {"name": "weather", "arguments": {"city": "Oslo"}}
    chat = [
        {"role": "user", "content": "weather in oslo"},
        {"role": "assistant", "content": "", "reasoning": "need data", "tool_calls": json.dumps([call])},
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "it rains", "reasoning": "the tool said so"},
        {"role": "user", "content": "and tomorrow"},
        {"role": "assistant", "content": "sun", "reasoning": "forecast"},
    ]
    rendered_call = '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'
    for reasoning, last in ((True, "<think>\nforecast\n</think>\n\nsun<|im_end|>"), (False, "sun<|im_end|>")):
        enc = Encoder(str(qwen_like), TokenizeConfig(reasoning=reasoning))
        [out] = enc.chats([chat])
        assert not isinstance(out, RowError), out
        assert _masked_text(enc, out.tokens, out.mask) == [rendered_call, "it rains<|im_end|>", last]


def test_chats_without_a_trainable_token_are_quarantined_with_the_reason(tiny_model: Path) -> None:
    enc = Encoder(str(tiny_model), TokenizeConfig())
    no_answer = [{"role": "user", "content": "hello"}]
    empty = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": ""}]
    a, b = enc.chats([no_answer, empty])
    assert isinstance(a, RowError) and "no assistant turn" in str(a)
    assert isinstance(b, RowError) and "empty assistant turn" in str(b)


def test_documents_end_with_eos_and_train_on_every_token(tiny_model: Path) -> None:
    enc = Encoder(str(tiny_model), TokenizeConfig())
    a, b = enc.documents(["the water of the river", "one"])
    assert a.tokens[-1] == b.tokens[-1] == enc.eos and a.mask is None and b.mask is None
    assert enc.hf.decode(a.tokens[:-1].tolist()) == "the water of the river"
    assert a.tokens.dtype == np.uint16  # a 1,024-token vocab


def test_a_tokenizer_that_cannot_load_says_what_was_tried(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tokenize.tokenizer: cannot load .*local cache only"):
        Encoder("nobody/no-such-tokenizer", TokenizeConfig())
    with pytest.raises(TokenizerError, match="a local directory"):
        Encoder(str(tmp_path), TokenizeConfig())


def test_tiktoken_gives_the_tokenizers_ids_or_is_not_used(tiny_model: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    fast = Encoder(str(tiny_model), TokenizeConfig())
    slow = Encoder(str(tiny_model), TokenizeConfig(fast=False))
    assert fast.tiktoken is not None and slow.tiktoken is None  # a byte-level BPE: checked and used
    rng = np.random.default_rng(0)
    pieces = ["the", " water", "Ünïcödé", "東京", "\n\n", "  ", "12345", "!?", "<|im_end|>", "don't", "🚀"]
    texts = ["".join(rng.choice(pieces, rng.integers(1, 40))) for _ in range(300)]
    got, want = fast.documents(texts), slow.documents(texts)
    assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(got, want, strict=True))
    im_end = fast.hf.convert_tokens_to_ids("<|im_end|>")
    assert im_end in fast.documents(["a <|im_end|> b"])[0].tokens  # added tokens as tokenizers maps them
    word = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    from forge.stages.tokenize.fast import tiktoken_for

    assert tiktoken_for(word) is None  # not byte-level BPE: tokenizers does the work


def test_messages_name_the_knobs_of_the_stage_that_encodes(tiny_model: Path, tmp_path: Path) -> None:
    """The score stage encodes with the same code; its rows' reasons and its errors name its knobs."""
    enc = Encoder(str(tiny_model), TokenizeConfig(eos=False), stage="score", tokenizer_key="model.tokenizer")
    [out] = enc.chats([[{"role": "user", "content": "hi"}]])
    assert isinstance(out, RowError) and "(score.mask)" in str(out)
    with pytest.raises(TokenizerError, match="^model.tokenizer: cannot load"):
        Encoder(str(tmp_path / "none"), TokenizeConfig(), stage="score", tokenizer_key="model.tokenizer")


TOOL_CHAT = [
    {"role": "user", "content": "weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": json.dumps(
            [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
        ),
    },
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny.", "reasoning": "the tool said sunny"},
]
DROPS = "turn 1: the chat template does not render its tool calls, so training on this row would teach"


def test_tool_calls_and_reasoning_a_template_drops_are_quarantined_or_kept_and_counted(
    tiny_model: Path, qwen_like: Path
) -> None:
    """The tiny model's ChatML template renders neither tool calls nor reasoning: the row is
    quarantined naming the turn (default), or kept with what was dropped listed, and the
    tool-call-only turn (a bare <|im_end|> once its calls are dropped) is not trained on. A template
    that renders both (Qwen-like) keeps the row untouched; reasoning=false does not ask for it."""
    [quarantined] = Encoder(str(tiny_model), TokenizeConfig()).chats([TOOL_CHAT])
    assert isinstance(quarantined, DroppedContent) and quarantined.step == "dropped_content"
    assert str(quarantined).startswith(DROPS) and "(tokenize.on_dropped=keep keeps such rows" in str(quarantined)
    keep = Encoder(str(tiny_model), TokenizeConfig(on_dropped="keep"))
    [kept] = keep.chats([TOOL_CHAT])
    assert kept.dropped == ("reasoning", "tool calls")
    assert _masked_text(keep, kept.tokens, kept.mask) == ["It is sunny.<|im_end|>"]
    only_reasoning = [m for m in TOOL_CHAT if m["role"] != "tool" and "tool_calls" not in m]
    [why] = Encoder(str(tiny_model), TokenizeConfig()).chats([only_reasoning])
    assert str(why).startswith("turn 1: the chat template does not render its reasoning")
    [fine] = Encoder(str(tiny_model), TokenizeConfig(reasoning=False)).chats([only_reasoning])
    assert not isinstance(fine, RowError) and fine.dropped == ()
    for mask in ("last", "all"):  # an untrained turn's tool calls are context the template loses too
        [out] = Encoder(str(tiny_model), TokenizeConfig(mask=mask, reasoning=False)).chats([TOOL_CHAT])
        assert str(out).startswith(DROPS), mask
    for mask in ("assistant", "last", "all"):
        rendering = Encoder(str(qwen_like), TokenizeConfig(mask=mask))
        rendered, past = rendering.chats([TOOL_CHAT, _agent_chat()])  # past reasoning dropped: not a loss
        assert rendered.dropped == past.dropped == (), mask
    enc = Encoder(str(qwen_like), TokenizeConfig())
    [out] = enc.chats([TOOL_CHAT])
    assert any("get_weather" in t and "Paris" in t for t in _masked_text(enc, out.tokens, out.mask))


def test_the_score_stage_quarantines_what_the_template_drops(tiny_model: Path) -> None:
    """score encodes with this code and has no on_dropped knob: the default, quarantine."""
    score = Encoder(str(tiny_model), TokenizeConfig(eos=False), stage="score", tokenizer_key="model.tokenizer")
    [out] = score.chats([TOOL_CHAT])
    assert isinstance(out, DroppedContent) and "on_dropped" not in str(out)
    [kept] = Encoder(str(tiny_model), TokenizeConfig(), stage="score", on_dropped="keep").chats([TOOL_CHAT])
    assert kept.dropped == ("reasoning", "tool calls")


def test_a_tool_call_only_turn_alone_leaves_nothing_to_train_on(tiny_model: Path) -> None:
    enc = Encoder(str(tiny_model), TokenizeConfig(on_dropped="keep"))
    [out] = enc.chats([TOOL_CHAT[:2]])
    assert isinstance(out, RowError) and "empty loss mask" in str(out)


SYSTEM_DEFAULT = (  # a template that writes a default system prompt (Qwen2.5 does)
    "{%- if messages[0].role != 'system' -%}{{- '<|im_start|>system\\nbe kind<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for m in messages -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def test_an_assistant_first_chat_is_masked_like_any_other(tiny_model: Path, tmp_path: Path) -> None:
    """Nothing precedes its first turn but what the template writes itself (a default system prompt,
    the assistant header): none of that is trained on."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = SYSTEM_DEFAULT
    tok.save_pretrained(tmp_path / "sys")
    chat = [
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "say ok"},
        {"role": "assistant", "content": "ok"},
    ]
    for name in (tiny_model, tmp_path / "sys"):
        enc = Encoder(str(name), TokenizeConfig())
        [out] = enc.chats([chat])
        assert not isinstance(out, RowError), out
        assert _masked_text(enc, out.tokens, out.mask) == ["Hello, how can I help?<|im_end|>", "ok<|im_end|>"]
