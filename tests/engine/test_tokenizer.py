from forge.engine.tokenizer import FastTokenizer, TransformersTokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "hello world"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Explain the water cycle, please."},
        {"role": "assistant", "content": "Water evaporates."},
        {"role": "user", "content": "And then? ünïcødé ✓"},
    ],
]


def test_fast_tokenizer_matches_transformers(tiny_model) -> None:
    """forge renders and counts without transformers; it must agree with transformers exactly."""
    fast = FastTokenizer(tiny_model)
    ref = TransformersTokenizer(str(tiny_model), None, False)
    assert fast.has_template and ref.has_template
    for conv in CONVERSATIONS:
        text = fast.render(conv)
        assert text == ref.render(conv)
        assert fast.encode(text) == ref.encode(text)
    ids = fast.encode("science history math")
    assert fast.decode(ids) == "science history math"
