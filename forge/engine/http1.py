"""A keep-alive HTTP/1.1 connection pool for engines served over plain http (`vllm serve`, SGLang,
a local gateway): POST a JSON body, read the whole answer.

Why forge owns this piece: against a zero-latency server on 2 cores, aiohttp's client served
9,000-14,000 requests/s where the same loop over asyncio protocols and httptools' parser (llhttp,
the parser uvicorn uses) served 27,000 (benchmarks/orchestration.py). aiohttp's per-request
objects (request and response classes, header multidicts, cookie jar, trace hooks) were the
bottleneck of the whole CLI. forge sends one kind of request, so the pool is small: https
endpoints (hosted APIs: TLS, proxies, redirects) keep aiohttp.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools


class HttpError(Exception):
    """The connection failed or the server's answer was not HTTP: transient, retried by the caller."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes


class _Connection(asyncio.Protocol):
    """One socket, one request at a time; the parser's callbacks fill in the answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future | None = None
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.open = False
        self.got_bytes = False  # this request saw any answer: a failure after that is not a stale socket
        self.until_eof = False  # an answer with neither Content-Length nor chunks ends when the socket does

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.open = True

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HttpError(f"malformed HTTP answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if exc is None and self.until_eof and self.waiter is not None:
            self.until_eof = False
            self.on_message_complete()
            return
        why = f": {exc}" if exc else ""
        self._fail(HttpError(f"connection closed before the answer ended{why}"), close=False)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.headers = {}
        self.chunks = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        self.until_eof = "content-length" not in self.headers and not chunked and self.parser.get_status_code() >= 200

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.until_eof = False
        waiter, self.waiter = self.waiter, None
        if not self.parser.should_keep_alive():
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(Response(self.parser.get_status_code(), self.headers, b"".join(self.chunks)))

    def _fail(self, exc: Exception, close: bool = True) -> None:
        waiter, self.waiter = self.waiter, None
        if close:
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.close()

    async def request(self, data: bytes, timeout_s: float) -> Response:
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.got_bytes = False
        assert self.transport is not None
        self.transport.write(data)
        # a timer, not asyncio.wait_for: no extra task per request on the hot path
        timer = loop.call_later(timeout_s, self._fail, asyncio.TimeoutError())
        try:
            return await self.waiter
        finally:
            timer.cancel()


class Http1Pool:
    """POST to one http:// server over at most `limit` keep-alive connections."""

    def __init__(self, base_url: str, headers: dict[str, str], limit: int) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"Http1Pool serves plain http:// URLs, not {base_url!r}")
        self.base_url = base_url
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal keeps its brackets
        host = host if parts.port is None else f"{host}:{self.port}"
        lines = [f"Host: {host}", "Accept: application/json", "User-Agent: forge", "Connection: keep-alive"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self._head = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self.limit = asyncio.Semaphore(limit)
        self.idle: list[_Connection] = []
        self.all: set[_Connection] = set()

    async def _connect(self, timeout_s: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            connecting = loop.create_connection(_Connection, self.host, self.port)
            _, conn = await asyncio.wait_for(connecting, timeout_s)
        except OSError as exc:
            raise HttpError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        self.all.add(conn)
        return conn

    async def post(self, path: str, body: bytes, timeout_s: float) -> Response:
        """POST `body` (JSON) to prefix + path. A kept-alive socket that the server closed while it
        sat idle is replaced at once (no answer byte had come back); other failures raise HttpError,
        and an answer slower than timeout_s asyncio.TimeoutError, for the caller's retry policy."""
        data = b"POST %s%s HTTP/1.1\r\n%sContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            self.prefix.encode(),
            path.encode(),
            self._head,
            len(body),
            body,
        )
        async with self.limit:
            while self.idle:
                conn = self.idle.pop()
                if not conn.open:
                    self.all.discard(conn)
                    continue
                try:
                    return self._settle(conn, await conn.request(data, timeout_s))
                except HttpError:
                    self.all.discard(conn)
                    if conn.got_bytes:
                        raise
                except BaseException:  # cancelled or timed out mid-answer: the socket is unusable
                    conn.close()
                    self.all.discard(conn)
                    raise
            conn = await self._connect(timeout_s)
            try:
                return self._settle(conn, await conn.request(data, timeout_s))
            except BaseException:
                conn.close()
                self.all.discard(conn)
                raise

    def _settle(self, conn: _Connection, response: Response) -> Response:
        if conn.open:
            self.idle.append(conn)
        else:
            self.all.discard(conn)
        return response

    def close(self) -> None:
        for conn in self.all:
            conn.close()
        self.all.clear()
        self.idle.clear()
