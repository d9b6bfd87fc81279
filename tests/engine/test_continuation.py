"""Continuing prompts keep the engine's own answer ids: checked with the tiny random-weight Qwen3's
real sampled output (its tokens do not round-trip through text, as on the GPU benchmark)."""

import pytest

from forge.engine.continuation import Continuations

QUESTION = [{"role": "user", "content": "Explain the water cycle, please."}]


@pytest.fixture(scope="module")
def sampled(tiny_model, tokenizer):
    """(prompt ids, answer ids ending in a sampled run of tokens, answer text) from the real model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    prompt = tokenizer.encode(tokenizer.render(QUESTION))
    torch.manual_seed(0)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=True, temperature=2.0, top_k=0)
    answer_ids = out[0, len(prompt) :].tolist()
    return prompt, answer_ids, tokenizer.decode(answer_ids)


def make(tokenizer, max_tokens: int = 0) -> Continuations:
    return Continuations(tokenizer.render, tokenizer.encode, max_tokens)


def test_a_continuing_prompt_starts_with_the_earlier_prompt_and_answer_ids(tokenizer, sampled) -> None:
    prompt, answer_ids, answer = sampled
    c = make(tokenizer)
    ids, text = c.prompt_ids(QUESTION)
    assert ids == prompt and text == tokenizer.render(QUESTION)
    c.remember(QUESTION, text, ids, answer, answer_ids, stopped_on_token=False)
    turns = [*QUESTION, {"role": "assistant", "content": answer}, {"role": "user", "content": "Now shorter."}]
    cont, full = c.prompt_ids(turns)
    assert full == tokenizer.render(turns)
    assert cont[: len(prompt) + len(answer_ids)] == prompt + answer_ids
    assert tokenizer.decode(cont) == tokenizer.decode(tokenizer.encode(full))  # the same text to the model
    assert c.reused == 1 and c.reused_tokens == len(prompt) + len(answer_ids)
    naive = tokenizer.encode(full)
    assert naive[: len(prompt) + len(answer_ids)] != prompt + answer_ids  # text would have missed the cache


def test_a_stop_token_is_left_to_the_template(tokenizer, sampled) -> None:
    prompt, answer_ids, answer = sampled
    eos = tokenizer.encode("<|im_end|>")
    assert len(eos) == 1
    c = make(tokenizer)
    _, text = c.prompt_ids(QUESTION)
    c.remember(QUESTION, text, prompt, answer, answer_ids + eos, stopped_on_token=True)
    turns = [*QUESTION, {"role": "assistant", "content": answer}, {"role": "user", "content": "Again."}]
    cont, _ = c.prompt_ids(turns)
    n = len(prompt) + len(answer_ids)
    assert cont[:n] == prompt + answer_ids and cont[n] == eos[0]  # once, from the template
    assert cont[n + 1] != eos[0]


def test_other_conversations_and_edited_answers_are_tokenized_from_text(tokenizer, sampled) -> None:
    prompt, answer_ids, answer = sampled
    c = make(tokenizer)
    c.remember(QUESTION, tokenizer.render(QUESTION), prompt, answer, answer_ids, stopped_on_token=False)
    edited = [*QUESTION, {"role": "assistant", "content": answer + "!"}, {"role": "user", "content": "Go on."}]
    other = [{"role": "user", "content": "Something else."}, {"role": "assistant", "content": answer}]
    other.append({"role": "user", "content": "Go on."})
    for turns in (edited, other):
        assert c.prompt_ids(turns)[0] == tokenizer.encode(tokenizer.render(turns))
    assert c.reused == 0


def test_a_template_that_renders_earlier_turns_differently_falls_back(tokenizer, sampled) -> None:
    """A template that rewrites an earlier assistant turn (Qwen3 drops its reasoning, say): text."""
    prompt, answer_ids, answer = sampled

    def rewriting(messages):
        return tokenizer.render([{**m, "content": m["content"].upper()} if m["role"] == "assistant" else m
                                 for m in messages])  # fmt: skip

    c = Continuations(rewriting, tokenizer.encode)
    c.remember(QUESTION, rewriting(QUESTION), prompt, answer, answer_ids, stopped_on_token=False)
    turns = [*QUESTION, {"role": "assistant", "content": answer}, {"role": "user", "content": "More."}]
    assert c.prompt_ids(turns)[0] == tokenizer.encode(rewriting(turns)) and c.reused == 0


def test_least_recently_used_answers_go_first_past_the_token_budget(tokenizer) -> None:
    c = make(tokenizer, max_tokens=100)
    convs = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    for conv in convs:
        ids, text = c.prompt_ids(conv)
        c.remember(conv, text, ids, "ok", [5] * 30, stopped_on_token=False)
    assert c.tokens <= 100 and len(c.entries) < 4
    last = [*convs[-1], {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and?"}]
    first = [*convs[0], {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and?"}]
    c.prompt_ids(last)
    assert c.reused == 1
    c.prompt_ids(first)
    assert c.reused == 1  # dropped
