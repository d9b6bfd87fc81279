"""One pooled keep-alive HTTP client for chat completions, with timeouts and classified retries.

429, 5xx, timeouts and connection errors are retried with exponential backoff (Retry-After
honoured); 4xx such as 400/422 are the row's fault and come back as RequestRejected with the
engine's own message. While the engine restarts, requests wait instead of spending retries.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from forge.engine.http1 import Http1Pool, HttpError
from forge.engine.server import Engine, EngineError

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_BACKOFF_S = 60.0


class RequestRejected(Exception):
    """The engine refused this request (4xx): quarantine the row, keep going."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class RequestFailed(Exception):
    """Retries exhausted on transient errors."""


@dataclass
class Completion:
    text: str
    reasoning: str | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    content_null: bool = False  # the engine sent `content: null` (or none): text is "" but not an answer
    cached_tokens: int = 0  # prompt tokens the engine served from its prefix cache (when it says)

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def error_message(body: str) -> str:
    """The human part of an error body: OpenAI `{"error": {"message"}}`, FastAPI `detail`, or text."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:500] or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or err.get("msg")
            if msg is not None:
                return str(msg)[:500]
        elif isinstance(err, str):
            return err[:500]
        if "detail" in data:
            return str(data["detail"])[:500]
    return body.strip()[:500]


def parse_completion(data: dict[str, Any]) -> Completion:
    choice = data["choices"][0]
    message = choice.get("message") or {}
    usage = data.get("usage") or {}
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    content = message.get("content")
    details = usage.get("prompt_tokens_details") or {}  # vllm serve: --enable-prompt-tokens-details
    return Completion(
        text=content or "",
        reasoning=reasoning or None,
        finish_reason=choice.get("finish_reason") or "unknown",
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        content_null=content is None,
        cached_tokens=int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0,
    )


class ChatClient:
    """POST /v1/chat/completions through one connection pool sized to the in-flight limit: forge's
    own HTTP/1.1 pool for http:// engines (forge/engine/http1.py says why), aiohttp for https://."""

    def __init__(
        self,
        engine: Engine,
        max_in_flight: int,
        timeout_s: float,
        max_retries: int,
        backoff_s: float,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_in_flight = max_in_flight
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.on_retry = on_retry or (lambda reason: None)
        self.session: aiohttp.ClientSession | None = None
        self.pool: Http1Pool | None = None
        self.headers: dict[str, str] = {}

    async def __aenter__(self) -> ChatClient:
        connector = aiohttp.TCPConnector(limit=self.max_in_flight, keepalive_timeout=120, force_close=False)
        self.headers = {"Content-Type": "application/json"}
        if self.engine.api_key:
            self.headers["Authorization"] = f"Bearer {self.engine.api_key}"
        self.session = aiohttp.ClientSession(connector=connector, headers=self.headers, timeout=self.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.pool:
            self.pool.close()
        if self.session:
            await self.session.close()

    def _http1(self, base_url: str) -> Http1Pool | None:
        """The pool for a plain-http engine; a restarted engine on a new address gets a new one."""
        if not base_url.startswith("http://"):
            return None
        if self.pool is None or self.pool.base_url != base_url:
            if self.pool is not None:
                self.pool.close()
            auth = {k: v for k, v in self.headers.items() if k != "Content-Type"}
            self.pool = Http1Pool(base_url, auth, self.max_in_flight)
        return self.pool

    async def _post(self, path: str, payload: bytes) -> tuple[int, str | None, bytes]:
        """(status, Retry-After, body); HttpError for a connection failure, TimeoutError when slow."""
        base_url = self.engine.base_url
        pool = self._http1(base_url)
        if pool is not None:
            resp = await pool.post(path, payload, self.timeout.total or 3600.0)
            return resp.status, resp.headers.get("retry-after"), resp.body
        assert self.session is not None, "use `async with ChatClient(...)`"
        try:
            async with self.session.post(f"{base_url}{path}", data=payload) as resp:
                return resp.status, resp.headers.get("Retry-After"), await resp.read()
        except aiohttp.ClientError as exc:
            raise HttpError(f"{exc.__class__.__name__}: {exc}") from exc

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), MAX_BACKOFF_S)
            except ValueError:
                pass
        base = min(self.backoff_s * (2**attempt), MAX_BACKOFF_S)
        return base * (0.5 + random.random() / 2)

    async def complete(self, body: dict[str, Any]) -> Completion:
        """Send one request; retry what is transient; raise RequestRejected / RequestFailed."""
        payload = orjson.dumps(body)
        attempt = 0
        while True:
            await self.engine.wait_ready()
            retry_after = None
            try:
                status, retry_header, raw = await self._post("/v1/chat/completions", payload)
                if status == 200:
                    try:
                        return parse_completion(orjson.loads(raw))
                    except (ValueError, KeyError, IndexError, TypeError):
                        reason = f"malformed 200 response: {raw[:200]!r}"
                elif status in (401, 403):  # the key, not the row: every row would fail
                    why = error_message(raw.decode(errors="replace"))
                    raise EngineError(
                        f"{self.engine.base_url} refused the API key (HTTP {status}: {why}); check "
                        "model.api_key_env and re-run the same command: no row was quarantined for it"
                    )
                elif status in RETRYABLE_STATUS:
                    reason = f"HTTP {status}: {error_message(raw.decode(errors='replace'))}"
                    retry_after = retry_header
                else:
                    raise RequestRejected(status, error_message(raw.decode(errors="replace")))
            except asyncio.TimeoutError:
                reason = f"timed out after {self.timeout.total:.0f} s"
            except HttpError as exc:
                reason = f"connection error: {exc}"
                if not self.engine.is_ready():
                    continue  # the engine is restarting: wait for it, this attempt does not count
            if attempt >= self.max_retries:
                raise RequestFailed(f"{reason} (gave up after {attempt} retries)")
            self.on_retry(reason)
            await asyncio.sleep(self._delay(attempt, retry_after))
            attempt += 1
