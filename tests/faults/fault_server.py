"""A TEST DOUBLE of an OpenAI-compatible chat server, for the fault matrix only.

It exists to inject faults a real engine cannot produce on demand: a malformed 200 body, a 200
JSON with no `choices`, 429 with Retry-After, 500, a hang past the client's timeout, and
`content: null`. Everything else is real: by default each request is proxied to the real CPU
engine (the `cpu_server` fixture: `transformers serve` of the tiny model), so answers, token
counts and finish reasons come from a real model.

It counts the requests received per prompt (the last user message) and keeps their arrival
times, so tests can assert that nothing already answered was sent again and that a Retry-After
was waited out. Bounded: it binds 127.0.0.1 only, on a free port, runs in one daemon thread of
the test process, and stops (hung requests included) when its `with` block or fixture ends.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from threaded_app import ThreadedApp

KINDS = ("malformed", "no_choices", "429", "500", "hang", "content_null")


@dataclass
class Fault:
    """Inject `kind` into requests whose prompt is in `prompts` (exact last user message) or
    whose arrival number (1-based, over the server's life) is in `requests`; with neither,
    into every request. `times` caps how often it fires (None: every match)."""

    kind: str
    prompts: frozenset[str] | None = None
    requests: frozenset[int] | None = None
    times: int | None = None
    fired: int = 0

    def matches(self, number: int, prompt: str) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        if self.prompts is None and self.requests is None:
            return True
        return (self.prompts is not None and prompt in self.prompts) or (
            self.requests is not None and number in self.requests
        )


class TokenBucket:
    """A provider's request-rate limit: `rate` requests/s, bursts of up to `burst`. Over it, a
    request gets 429 with Retry-After (whole seconds, as HTTP has it) and `retry-after-ms`; with
    `headers`, every answer also carries OpenAI's x-ratelimit-remaining/reset-requests."""

    def __init__(self, rate: float, burst: int, headers: bool) -> None:
        self.rate = rate
        self.burst = burst
        self.headers = headers
        self.tokens = float(burst)
        self.at = time.monotonic()

    def take(self) -> tuple[bool, dict[str, str]]:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        ok = self.tokens >= 1.0
        if ok:
            self.tokens -= 1.0
        wait_s = max(1.0 - self.tokens, 0.0) / self.rate
        out: dict[str, str] = {}
        if self.headers:
            out["x-ratelimit-limit-requests"] = str(int(self.rate * 60))
            out["x-ratelimit-remaining-requests"] = str(int(self.tokens))
            out["x-ratelimit-reset-requests"] = f"{max(int(wait_s * 1000), 1)}ms"
        if not ok:
            out["Retry-After"] = str(max(1, round(wait_s)))
            out["retry-after-ms"] = str(max(int(wait_s * 1000), 1))
        return ok, out


@dataclass
class Seen:
    number: int
    prompt: str
    at: float  # time.monotonic() on arrival
    fault: str | None
    authorization: str | None = field(repr=False, default=None)
    limited: bool = False  # answered 429 by the token bucket


def last_user_message(body: Any) -> str:
    try:
        users = [m for m in body["messages"] if m.get("role") == "user"]
        content = users[-1]["content"]
    except (KeyError, IndexError, TypeError, AttributeError):
        return ""
    return content if isinstance(content, str) else orjson.dumps(content).decode()


class FaultServer(ThreadedApp):
    """`with FaultServer(upstream_url) as fs:` ... `fs.url` is the base URL to give forge."""

    name = "fault server"

    def __init__(self, upstream: str, delay_s: float = 0.0, hang_s: float = 30.0, retry_after: str = "1") -> None:
        super().__init__()
        self.upstream = upstream.rstrip("/")
        self.delay_s = delay_s  # added to every request: slows a run down so it can be killed mid-way
        self.hang_s = hang_s  # how long a "hang" holds the request (cut short when the server stops)
        self.retry_after = retry_after
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._seen: list[Seen] = []
        self._bucket: TokenBucket | None = None

    # --- the fault plan, set from the test thread -------------------------------------------

    def inject(
        self,
        kind: str,
        prompts: Iterable[str] | None = None,
        requests: Iterable[int] | None = None,
        times: int | None = None,
    ) -> Fault:
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {KINDS}")
        fault = Fault(
            kind,
            frozenset(prompts) if prompts is not None else None,
            frozenset(requests) if requests is not None else None,
            times,
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def rate_limit(self, rate: float | None, burst: int = 1, headers: bool = True) -> None:
        """Limit requests to `rate`/s (TokenBucket), or lift the limit (None); may change mid-run."""
        with self._lock:
            self._bucket = TokenBucket(rate, burst, headers) if rate else None

    def clear(self) -> None:
        """The faults are gone (the engine is healthy again); counts are kept."""
        with self._lock:
            self._faults.clear()

    # --- what it saw, read from the test thread ------------------------------------------------

    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    @property
    def total(self) -> int:
        with self._lock:
            return len(self._seen)

    def counts(self) -> Counter:
        """Requests received per prompt (faulted ones included)."""
        with self._lock:
            return Counter(s.prompt for s in self._seen)

    def arrivals(self, prompt: str) -> list[float]:
        with self._lock:
            return [s.at for s in self._seen if s.prompt == prompt]

    def authorizations(self) -> set[str | None]:
        with self._lock:
            return {s.authorization for s in self._seen}

    # --- the server ----------------------------------------------------------------------------

    def _take(self, body: Any, auth: str | None) -> str | None:
        """Count the request; the fault to inject into it, if any."""
        prompt = last_user_message(body)
        with self._lock:
            number = len(self._seen) + 1
            kind = None
            for fault in self._faults:
                if fault.matches(number, prompt):
                    fault.fired += 1
                    kind = fault.kind
                    break
            self._seen.append(Seen(number, prompt, time.monotonic(), kind, auth))
        return kind

    async def _proxy(self, method: str, path: str, data: bytes | None = None) -> tuple[int, bytes, str]:
        async with self._session.request(
            method, f"{self.upstream}{path}", data=data, headers={"Content-Type": "application/json"}
        ) as resp:
            return resp.status, await resp.read(), resp.headers.get("Content-Type", "application/json")

    async def _models(self, request: web.Request) -> web.Response:
        status, raw, ctype = await self._proxy("GET", "/v1/models")
        return web.Response(status=status, body=raw, content_type=ctype.split(";")[0])

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw_in = await request.read()
        try:
            body = orjson.loads(raw_in)
        except orjson.JSONDecodeError:
            body = None
        kind = self._take(body, request.headers.get("Authorization"))
        with self._lock:
            allowed, limit_headers = self._bucket.take() if self._bucket else (True, {})
            if not allowed:
                self._seen[-1].limited = True
        if not allowed:
            return web.json_response(
                {"error": {"message": "rate limit reached (token bucket of the fault server)"}},
                status=429,
                headers=limit_headers,
            )
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if kind == "hang":
            try:
                await asyncio.wait_for(self._stop.wait(), self.hang_s)
            except asyncio.TimeoutError:
                pass
            return web.Response(status=504, text="hung (fault server)")
        if kind == "429":
            return web.json_response(
                {"error": {"message": "rate limited (injected by the fault server)"}},
                status=429,
                headers={"Retry-After": self.retry_after},
            )
        if kind == "500":
            return web.Response(status=500, text="Internal Server Error (injected by the fault server)")
        if kind == "malformed":
            return web.Response(
                status=200, body=b'{"id": "chatcmpl-x", "choices": [{"mess', content_type="application/json"
            )
        status, raw, ctype = await self._proxy("POST", "/v1/chat/completions", raw_in)
        if limit_headers:
            response = web.Response(status=status, body=raw, content_type=ctype.split(";")[0], headers=limit_headers)
            return response
        if status == 200 and kind in ("no_choices", "content_null"):
            answer = orjson.loads(raw)
            if kind == "no_choices":
                answer.pop("choices", None)
            else:
                answer["choices"][0]["message"]["content"] = None
            raw = orjson.dumps(answer)
        return web.Response(status=status, body=raw, content_type=ctype.split(";")[0])

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app


def endpoint_run_args(fs: FaultServer, model: str | Path, key_env: str, data: Path, out: Path) -> list[str]:
    """forge overrides for a small run against this server: endpoint engine, tiny model, 4 tokens,
    chunks of 5 rows. Tests add their own run.* settings."""
    return [
        "model.engine=endpoint",
        f"model.endpoint_url={fs.url}",
        f"model.name_or_path={model}",
        f"model.api_key_env={key_env}",
        "model.max_model_len=2048",
        *small_run_args(data, out),
    ]


def small_run_args(data: Path, out: Path) -> list[str]:
    return [
        f"dataset.name={data}",
        "dataset.id_column=id",
        "generation.max_tokens=4",
        f"output.dir={out}",
        "output.examples_per_chunk=5",
    ]
