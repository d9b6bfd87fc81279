"""OpenAI chat bodies as Messages API params, and Anthropic's result lines as OpenAI's."""

from forge.engine.anthropic_batch import to_openai, to_params
from forge.engine.client import parse_completion


def test_a_chat_body_becomes_messages_params() -> None:
    body = {"model": "claude-x", "max_tokens": 64, "temperature": 0.3, "seed": 7, "stop": ["END"],
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}  # fmt: skip
    assert to_params(body) == {
        "model": "claude-x",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}],
        "system": "Be brief.",
        "temperature": 0.3,
        "stop_sequences": ["END"],
    }  # seed: the Messages API has none, so it is left out


def test_result_lines_as_openai_answers() -> None:
    ok = {"custom_id": "k1", "result": {"type": "succeeded", "message": {
        "id": "msg_1", "content": [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "Hello"}],
        "stop_reason": "max_tokens",
        "usage": {"input_tokens": 5, "cache_read_input_tokens": 7, "output_tokens": 3}}}}  # fmt: skip
    line = to_openai(ok)
    c = parse_completion(line["response"]["body"])
    assert (c.text, c.reasoning, c.finish_reason) == ("Hello", "hmm", "length")
    assert (c.prompt_tokens, c.cached_tokens, c.completion_tokens) == (12, 7, 3)
    refused = {"custom_id": "k2", "result": {"type": "errored", "error": {
        "type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}}}  # fmt: skip
    assert to_openai(refused)["response"]["status_code"] == 400
    overloaded = {"custom_id": "k3", "result": {"type": "errored", "error": {"type": "error",
                  "error": {"type": "overloaded_error", "message": "busy"}}}}  # fmt: skip
    assert to_openai(overloaded)["response"]["status_code"] == 500
    assert to_openai({"custom_id": "k4", "result": {"type": "expired"}}) is None
