"""A zero-latency OpenAI-compatible server for orchestration benchmarks: every chat or completion
request gets a canned answer at once, so what is measured is the client's own overhead. With
`--words N` the answers are N words of varied text (1,000 prepared bodies in turn), so output files
hold real-sized, distinct answers. A benchmark double (no model):
`python benchmarks/canned_server.py PORT [--words N]`."""

from __future__ import annotations

import argparse
import itertools
import json
import random

from aiohttp import web

VOCAB = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or has had not "
    "data model train token answer question reason step proof value table river mountain city music science "
    "history garden window market doctor engine signal bridge planet ocean forest letter number simple careful"
).split()


def canned_answer(words: int, seed: int = 0) -> bytes:
    """One JSON answer, its content `words` words long (the usage counts say so)."""
    rng = random.Random(seed)
    text = "A canned answer." if words <= 3 else " ".join(rng.choice(VOCAB) for _ in range(words))
    return json.dumps(
        {
            "id": "canned",
            "object": "chat.completion",
            "model": "canned",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "text": text,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 20, "completion_tokens": max(words, 4), "total_tokens": 20 + max(words, 4)},
        }
    ).encode()


MODELS = json.dumps({"object": "list", "data": [{"id": "canned", "object": "model", "max_model_len": 4096}]}).encode()


def app(words: int = 3) -> web.Application:
    bodies = itertools.cycle([canned_answer(words, seed) for seed in range(1 if words <= 3 else 1000)])
    count = {"requests": 0}

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        count["requests"] += 1
        return web.Response(body=next(bodies), content_type="application/json")

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
    parser.add_argument("--words", type=int, default=3, help="answer length in words (default: a 4-token answer)")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app(args.words), host="127.0.0.1", port=args.port, access_log=None, print=None)
