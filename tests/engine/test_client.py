"""ChatClient against a FAULT-INJECTING FAKE server (a test double): a real engine cannot be made
to answer 429, 500 or a hang on demand. Everything else is tested against the real CPU engine."""

import asyncio
import json

import pytest
from aiohttp import web

from forge.config import EngineKind, ModelConfig
from forge.engine import ChatClient, RequestFailed, RequestRejected
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


async def _run(script, body=None, retries=3, timeout=5.0, key_env=None, n=1):
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
        async with ChatClient(engine, 4, timeout, retries, 0.01, on_retry=retried.append) as client:
            try:
                results = await asyncio.gather(
                    *(client.complete(body or {"model": "m", "messages": []}) for _ in range(n))
                )
                result = results[0]
            except (RequestRejected, RequestFailed) as exc:
                result = exc
        return result, fake, retried, engine
    finally:
        await runner.cleanup()


def test_success_parses_reasoning_and_reported_context() -> None:
    result, fake, retried, engine = asyncio.run(_run([]))
    assert (result.text, result.reasoning, result.finish_reason, result.completion_tokens) == ("hi", "think", "stop", 1)
    assert engine.reported_max_model_len == 4096 and retried == []


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


def test_missing_key_env_is_clear(monkeypatch) -> None:
    monkeypatch.delenv("FORGE_NOPE_KEY", raising=False)
    with pytest.raises(EngineError, match=r"\$FORGE_NOPE_KEY, which is not set"):
        Endpoint(ModelConfig(engine=EngineKind.endpoint, endpoint_url="http://x", api_key_env="FORGE_NOPE_KEY"))


def test_one_keep_alive_pool_not_a_connection_per_request() -> None:
    result, fake, _, _ = asyncio.run(_run([], n=60))
    assert fake.calls == 60 and len(fake.peers) <= 4  # the pool is sized to max_in_flight=4
