"""ChatClient against a FAULT-INJECTING FAKE server (a test double): a real engine cannot be made
to answer 429, 500 or a hang on demand. Everything else is tested against the real CPU engine."""

import asyncio
import json

import pytest
from aiohttp import web

from forge.engine import ChatClient, RequestFailed, RequestRejected
from forge.engine.client import Completion, parse_completion
from forge.engine.config import EngineKind, ModelConfig
from forge.engine.server import Endpoint, EngineError

OK = {
    "choices": [{"message": {"content": "hi", "reasoning_content": "think"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1},
}


class FaultyServer:
    """Test double: replies from a script, one entry per request, then 200s."""

    def __init__(self, script: list) -> None:
        self.script = list(script)
        self.calls = 0
        self.auth: list[str | None] = []
        self.peers: set = set()

    async def chat(self, request: web.Request) -> web.Response:
        self.calls += 1
        self.auth.append(request.headers.get("Authorization"))
        self.peers.add(request.transport.get_extra_info("peername"))
        step = self.script.pop(0) if self.script else 200
        if step == "hang":
            await asyncio.sleep(2)
        if isinstance(step, tuple):
            status, body, headers = step
            return web.Response(status=status, text=body, headers=headers)
        return web.json_response(OK)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m", "max_model_len": 4096}]})


async def _run(script, body=None, retries=3, timeout=5.0, key_env=None, n=1, adaptive=None, one_by_one=False):
    fake = FaultyServer(script)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat)
    app.router.add_get("/v1/models", fake.models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        engine = Endpoint(
            ModelConfig(
                engine=EngineKind.endpoint,
                endpoint_url=f"http://127.0.0.1:{port}/v1",
                name_or_path="m",
                api_key_env=key_env,
            )
        )
        await engine.start()
        retried: list[str] = []
        async with ChatClient(engine, 4, timeout, retries, 0.01, retried.append, adaptive) as client:
            try:
                calls = [client.complete(body or {"model": "m", "messages": []}) for _ in range(n)]
                results = [await c for c in calls] if one_by_one else await asyncio.gather(*calls)
                result = results[-1] if one_by_one else results[0]
            except (RequestRejected, RequestFailed, EngineError) as exc:
                result = exc
        return result, fake, retried, engine
    finally:
        await runner.cleanup()


def test_success_parses_reasoning_and_reported_context() -> None:
    result, fake, retried, engine = asyncio.run(_run([]))
    assert (result.text, result.reasoning, result.finish_reason, result.completion_tokens) == ("hi", "think", "stop", 1)
    assert engine.reported_max_model_len == 4096 and retried == []


@pytest.mark.parametrize(
    "message, text, null",
    [
        ({"content": None}, "", True),
        ({"role": "assistant"}, "", True),  # content absent
        (None, "", True),  # the whole message null
        ({"content": ""}, "", False),  # an empty answer is an answer, not a null
        ({"content": "hi"}, "hi", False),
    ],
)
def test_null_or_absent_content_is_flagged(message, text, null) -> None:
    c = parse_completion({"choices": [{"message": message, "finish_reason": "stop"}], "usage": {}})
    assert (c.text, c.content_null) == (text, null)
    assert Completion(**c.to_json()) == c  # the flag survives the request cache round trip


def test_answers_cached_before_the_flag_existed_still_load() -> None:
    old = {"text": "x", "reasoning": None, "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1}
    assert Completion(**old).content_null is False


def test_content_null_over_http_is_flagged_not_retried() -> None:
    body = {"choices": [{"message": {"role": "assistant", "content": None}, "finish_reason": "stop"}], "usage": {}}
    result, fake, retried, _ = asyncio.run(_run([(200, json.dumps(body), {"Content-Type": "application/json"})]))
    assert result.text == "" and result.content_null and fake.calls == 1 and retried == []


@pytest.mark.parametrize(
    "fault",
    [
        (429, '{"error": {"message": "slow down"}}', {"Retry-After": "0"}),
        (500, "Internal Server Error", {}),
        (503, "", {}),
        (200, "not json", {}),
    ],
)
def test_transient_faults_are_retried(fault) -> None:
    result, fake, retried, _ = asyncio.run(_run([fault, fault]))
    assert result.text == "hi" and fake.calls == 3 and len(retried) == 2


def test_timeout_is_retried() -> None:
    result, fake, retried, _ = asyncio.run(_run(["hang"], timeout=0.5))
    assert result.text == "hi" and "timed out" in retried[0]


def test_retries_exhausted_raise_request_failed() -> None:
    result, fake, _, _ = asyncio.run(_run([(500, "boom", {})] * 5, retries=2))
    assert isinstance(result, RequestFailed) and "HTTP 500: boom" in str(result) and fake.calls == 3


@pytest.mark.parametrize(
    "status, body, message",
    [
        (400, json.dumps({"error": {"message": "prompt too long", "type": "BadRequestError"}}), "prompt too long"),
        (400, json.dumps({"object": "error", "message": "max_tokens too large"}), "max_tokens too large"),
        (422, json.dumps({"detail": "Unexpected fields in the request: {'top_k'}"}), "Unexpected fields"),
        (404, "no such model", "no such model"),
    ],
)
def test_client_errors_are_rejected_not_retried(status, body, message) -> None:
    result, fake, retried, _ = asyncio.run(_run([(status, body, {})]))
    assert isinstance(result, RequestRejected) and result.status == status and message in result.message
    assert fake.calls == 1 and retried == []


def test_api_key_from_named_env_var(monkeypatch) -> None:
    monkeypatch.setenv("FORGE_TEST_KEY", "sk-test-secret-123456789")
    result, fake, _, _ = asyncio.run(_run([], key_env="FORGE_TEST_KEY"))
    assert fake.auth == ["Bearer sk-test-secret-123456789"]


def test_unset_key_env_sends_no_key_and_says_so(monkeypatch, caplog) -> None:
    """A local server usually needs no key: an unset model.api_key_env is logged, not fatal."""
    monkeypatch.delenv("FORGE_NOPE_KEY", raising=False)
    with caplog.at_level("INFO", logger="forge.engine"):
        engine = Endpoint(
            ModelConfig(engine=EngineKind.endpoint, endpoint_url="http://x", api_key_env="FORGE_NOPE_KEY")
        )
    assert engine.api_key is None
    assert "$FORGE_NOPE_KEY" in caplog.text and "without an Authorization header" in caplog.text
    monkeypatch.setenv("FORGE_NOPE_KEY", "sk-set")
    assert (
        Endpoint(ModelConfig(engine=EngineKind.endpoint, endpoint_url="http://x", api_key_env="FORGE_NOPE_KEY")).api_key
        == "sk-set"
    )


def test_one_keep_alive_pool_not_a_connection_per_request() -> None:
    result, fake, _, _ = asyncio.run(_run([], n=60))
    assert fake.calls == 60 and len(fake.peers) <= 4  # the pool is sized to max_in_flight=4


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_stops_the_run_instead_of_quarantining_every_row(status) -> None:
    result, fake, retried, _ = asyncio.run(_run([(status, json.dumps({"error": {"message": "bad key"}}), {})]))
    assert isinstance(result, EngineError) and f"HTTP {status}: bad key" in str(result) and "api_key_env" in str(result)
    assert fake.calls == 1 and retried == []


def test_a_spent_quota_stops_the_run_instead_of_retrying_every_row() -> None:
    quota = json.dumps({"error": {"message": "You exceeded your current quota, please check your plan and billing",
                                  "code": "insufficient_quota"}})  # fmt: skip
    result, fake, retried, _ = asyncio.run(_run([(429, quota, {})]))
    assert isinstance(result, EngineError) and "quota is used up" in str(result) and fake.calls == 1
    assert retried == []


def test_throttling_while_others_are_answered_uses_no_retries() -> None:
    """With adaptive concurrency, 429s while the server keeps answering others are waits, not
    failures: more 429s than run.max_retries still end in an answer."""
    from forge.engine.adaptive import AdaptiveLimit

    limited = (429, '{"error": {"message": "rate limit"}}', {"retry-after-ms": "10"})
    adaptive = AdaptiveLimit(start=2, ceiling=4)
    result, fake, retried, _ = asyncio.run(
        _run([200, *[limited] * 4], retries=1, n=2, adaptive=adaptive, one_by_one=True)
    )
    assert result.text == "hi" and fake.calls == 6 and len(retried) == 4
    assert adaptive.cuts == 4 and not adaptive.slow_start  # each 429 came from a send after the last cut
    # told when to come back (Retry-After), a request waits without using retries even before any answer
    result, fake, _, _ = asyncio.run(_run([limited] * 4, retries=1, adaptive=AdaptiveLimit(start=2, ceiling=4)))
    assert result.text == "hi" and fake.calls == 5
    # with neither an answer to show the server is serving nor a Retry-After, 429s use up the retries
    bare = (429, '{"error": {"message": "rate limit"}}', {})
    result, fake, _, _ = asyncio.run(_run([bare] * 4, retries=1, adaptive=AdaptiveLimit(start=2, ceiling=4)))
    assert isinstance(result, RequestFailed) and fake.calls == 2


def test_a_request_larger_than_the_rate_limit_is_the_rows_fault() -> None:
    big = json.dumps({"error": {"message": "Request too large for gpt-4o on tokens per min (TPM): Limit 30000, "
                                           "Requested 45000."}})  # fmt: skip
    result, fake, retried, _ = asyncio.run(_run([(429, big, {"Retry-After": "1"})] * 3))
    assert isinstance(result, RequestRejected) and result.status == 429 and fake.calls == 1 and retried == []
