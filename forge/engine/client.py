"""One pooled keep-alive HTTP client for chat completions, with timeouts and classified retries.

429, 5xx, timeouts and connection errors are retried with exponential backoff (Retry-After
honoured); 4xx such as 400/422 are the row's fault and come back as RequestRejected with the
engine's own message. While the engine restarts, requests wait instead of spending retries.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from forge.engine.adaptive import AdaptiveLimit, reset_seconds
from forge.engine.http1 import Http1Pool, HttpError
from forge.engine.server import Engine, EngineError

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
CONGESTION_STATUS = {429, 503, 504}  # the server is full: adaptive concurrency cuts
THROTTLE_LIMIT_S = 900.0  # a request waits on 429s (without using retries) at most this long
# a 429 for one request larger than the whole per-minute limit (OpenAI: "Request too large for ...")
TOO_LARGE = re.compile(r"request too large|requested \d+\W+(?:tokens\W+)?(?:but )?(?:the )?limit", re.I)
# a 429 that is a spent quota, not a rate (OpenAI: "You exceeded your current quota ... insufficient_quota")
QUOTA = re.compile(
    r"insufficient_quota|exceeded your current quota|quota (?:is )?exceeded|credit balance is too low", re.I
)
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


def retry_after_s(headers: dict[str, str]) -> float | None:
    """How long the server asks us to wait: `retry-after-ms` (OpenAI), else `Retry-After`
    (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = reset_seconds(value)
    if seconds is None:
        try:
            from email.utils import parsedate_to_datetime

            seconds = max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
        except (TypeError, ValueError):
            return None
    return seconds


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
        adaptive: AdaptiveLimit | None = None,
    ) -> None:
        self.engine = engine
        self.adaptive = adaptive  # None: max_in_flight is fixed (engines forge starts itself)
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

    async def _post(self, path: str, payload: bytes) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body); HttpError for a connection failure,
        TimeoutError when slow."""
        base_url = self.engine.base_url
        pool = self._http1(base_url)
        if pool is not None:
            resp = await pool.post(path, payload, self.timeout.total or 3600.0)
            return resp.status, resp.headers, resp.body
        assert self.session is not None, "use `async with ChatClient(...)`"
        try:
            async with self.session.post(f"{base_url}{path}", data=payload) as resp:
                headers = {k.lower(): v for k, v in resp.headers.items()}
                return resp.status, headers, await resp.read()
        except aiohttp.ClientError as exc:
            raise HttpError(f"{exc.__class__.__name__}: {exc}") from exc

    async def _send(self, path: str, payload: bytes) -> tuple[int, dict[str, str], bytes]:
        """_post within the adaptive limit, telling it how the answer went."""
        if self.adaptive is None:
            return await self._post(path, payload)
        seq = await self.adaptive.acquire()
        try:
            status, headers, raw = await self._post(path, payload)
        except asyncio.TimeoutError:
            self.adaptive.congested(seq)
            raise
        finally:
            self.adaptive.release()
        self.adaptive.observe(headers)
        if status in CONGESTION_STATUS:
            self.adaptive.congested(seq, retry_after_s(headers), rate_limited=status == 429)
        elif status == 200:
            self.adaptive.healthy()
        return status, headers, raw

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, MAX_BACKOFF_S)
        base = min(self.backoff_s * (2**attempt), MAX_BACKOFF_S)
        return base * (0.5 + random.random() / 2)

    async def complete(self, body: dict[str, Any], key: str | None = None, priority: int = 0) -> Completion:
        """Send one request; retry what is transient; raise RequestRejected / RequestFailed.
        key: the request's cache key (a batch engine's custom id; unused here); priority: the
        in-process engine's scheduling priority (unused here)."""
        payload = orjson.dumps(body)
        attempt = 0
        waited_s = 0.0  # on 429s that asked to wait (Retry-After), counted toward THROTTLE_LIMIT_S
        while True:
            await self.engine.wait_ready()
            retry_after = None
            throttled = False
            try:
                status, headers, raw = await self._send("/v1/chat/completions", payload)
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
                    why = error_message(raw.decode(errors="replace"))
                    if status == 429 and TOO_LARGE.search(why):  # this request can never fit the limit
                        raise RequestRejected(status, why)
                    if status == 429 and QUOTA.search(why):  # not a rate: every row would fail alike
                        raise EngineError(
                            f"{self.engine.base_url} says the account's quota is used up (HTTP 429: {why}); "
                            "no row was quarantined for it: re-run the same command once the quota is raised"
                        )
                    reason = f"HTTP {status}: {why}"
                    retry_after = retry_after_s(headers)
                    # throttled while others are answered, or told when to come back: this request
                    # waits its turn, and the wait uses no retry (a rate limit is not the row's failure)
                    throttled = (
                        status == 429
                        and self.adaptive is not None
                        and waited_s < THROTTLE_LIMIT_S
                        and (self.adaptive.answered_within(60.0) or retry_after is not None)
                    )
                else:
                    raise RequestRejected(status, error_message(raw.decode(errors="replace")))
            except asyncio.TimeoutError:
                reason = f"timed out after {self.timeout.total:.0f} s"
            except HttpError as exc:
                reason = f"connection error: {exc}"
                if not self.engine.is_ready():
                    continue  # the engine is restarting: wait for it, this attempt does not count
            if attempt >= self.max_retries and not throttled:
                raise RequestFailed(f"{reason} (gave up after {attempt} retries)")
            self.on_retry(reason)
            delay = self._delay(attempt, retry_after)
            waited_s += delay if throttled else 0.0
            await asyncio.sleep(delay)
            attempt += not throttled
