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


def test_a_name_no_hub_serves_fails_at_once_without_transformers(tmp_path, monkeypatch) -> None:
    """An endpoint's model name (`gpt-4.1-mini`) on a machine that cannot reach the Hub: one quick
    look, then TokenizerUnavailable; before, hf_hub_download and transformers retried for a minute."""
    import socket

    import pytest

    from forge.engine.tokenizer import TokenizerUnavailable, load_tokenizer

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TokenizerUnavailable, match="'some-org/gpt-like' is not in the local Hub cache and HF_HUB_OFF"):
        load_tokenizer("some-org/gpt-like")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(TokenizerUnavailable, match="'some-org/gpt-like' is neither a local directory"):
        load_tokenizer("some-org/gpt-like")
