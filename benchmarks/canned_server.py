"""A zero-latency OpenAI-compatible server for orchestration benchmarks: every chat or completion
request gets the same canned answer at once, so what is measured is the client's own overhead.
A benchmark double (no model); run as `python benchmarks/canned_server.py PORT`."""

from __future__ import annotations

import argparse
import json

from aiohttp import web

ANSWER = json.dumps(
    {
        "id": "canned",
        "object": "chat.completion",
        "model": "canned",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "A canned answer."},
                "text": "A canned answer.",
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24},
    }
).encode()
MODELS = json.dumps({"object": "list", "data": [{"id": "canned", "object": "model", "max_model_len": 4096}]}).encode()


def app() -> web.Application:
    count = {"requests": 0}

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        count["requests"] += 1
        return web.Response(body=ANSWER, content_type="application/json")

    async def models(request: web.Request) -> web.Response:
        return web.Response(body=MODELS, content_type="application/json")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(count)

    application = web.Application()
    application.router.add_post("/v1/chat/completions", answer)
    application.router.add_post("/v1/completions", answer)
    application.router.add_get("/v1/models", models)
    application.router.add_get("/stats", stats)
    return application


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int, help="port on 127.0.0.1")
    port = parser.parse_args().port
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app(), host="127.0.0.1", port=port, access_log=None, print=None)
