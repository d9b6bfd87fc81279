"""forge's HTTP/1.1 pool against a SCRIPTED RAW-SOCKET SERVER (a test double): no real engine closes
a kept-alive socket, answers in chunks, sends garbage or hangs on demand. Real sockets, real parser."""

import asyncio
import json

import pytest

from forge.engine.http1 import Http1Pool, HttpError

BODY = json.dumps({"ok": True}).encode()


def answer(body: bytes = BODY, status: str = "200 OK", extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"%x\r\n%s\r\n" % (5, BODY[:5])
    + b"%x\r\n%s\r\n" % (len(BODY) - 5, BODY[5:])
    + b"0\r\n\r\n"
)


class Scripted:
    """Reads one request at a time; answers with the next script step: bytes, 'close' (drop the
    socket without an answer), 'close-after' (answer, then close), 'hang'."""

    def __init__(self, script: list) -> None:
        self.script = list(script)
        self.requests: list[bytes] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                self.requests.append(head + await reader.readexactly(length))
                step = self.script.pop(0) if self.script else answer()
                if step == "close":
                    break
                if step == "hang":
                    await asyncio.sleep(5)
                    break
                close_after = isinstance(step, tuple)
                writer.write(step[0] if close_after else step)
                await writer.drain()
                if close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


async def _serve(script: list, fn, limit: int = 4, prefix: str = ""):
    fake = Scripted(script)
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Http1Pool(f"http://127.0.0.1:{port}{prefix}", {"Authorization": "Bearer k"}, limit)
    try:
        return await fn(pool), fake
    finally:
        pool.close()
        server.close()


def test_keep_alive_reuses_one_socket_and_sends_path_headers_body() -> None:
    async def three(pool):
        return [await pool.post("/v1/chat/completions", b'{"a":1}', 5) for _ in range(3)]

    responses, fake = asyncio.run(_serve([], three, prefix="/api"))
    assert [r.status for r in responses] == [200, 200, 200]
    assert all(json.loads(r.body) == {"ok": True} for r in responses)
    assert fake.connections == 1
    first = fake.requests[0]
    assert first.startswith(b"POST /api/v1/chat/completions HTTP/1.1\r\n")
    assert b"Authorization: Bearer k\r\n" in first and b"Content-Length: 7\r\n" in first
    assert first.endswith(b'{"a":1}')


def test_chunked_answer_headers_and_error_status() -> None:
    async def two(pool):
        return [await pool.post("/x", b"{}", 5) for _ in range(2)]

    script = [CHUNKED, answer(b'{"error":"slow down"}', "429 Too Many Requests", "Retry-After: 3\r\n")]
    (chunked, limited), fake = asyncio.run(_serve(script, two))
    assert chunked.status == 200 and chunked.body == BODY
    assert limited.status == 429 and limited.headers["retry-after"] == "3"
    assert fake.connections == 1


def test_an_answer_that_ends_with_its_socket() -> None:
    """HTTP/1.0-style: no Content-Length, no chunks; the body is whatever came before the close."""

    async def one(pool):
        return await pool.post("/x", b"{}", 5)

    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + BODY
    response, _ = asyncio.run(_serve([(raw,)], one))
    assert response.status == 200 and response.body == BODY


def test_connection_close_answer_then_a_fresh_socket() -> None:
    async def two(pool):
        first = await pool.post("/x", b"{}", 5)
        return first, await pool.post("/x", b"{}", 5)

    (first, second), fake = asyncio.run(_serve([(answer(extra="Connection: close\r\n"),)], two))
    assert first.status == second.status == 200
    assert fake.connections == 2


def test_a_socket_the_server_closed_while_idle_is_replaced_without_an_error() -> None:
    async def two(pool):
        first = await pool.post("/x", b"{}", 5)
        await asyncio.sleep(0.1)  # the server has dropped the idle socket by now
        return first, await pool.post("/x", b"{}", 5)

    (first, second), fake = asyncio.run(_serve([(answer(),)], two))
    assert first.status == second.status == 200
    assert fake.connections == 2 and len(fake.requests) == 2


def test_dropped_mid_request_is_an_http_error_not_a_hang() -> None:
    async def one(pool):
        with pytest.raises(HttpError, match="connection closed before the answer ended"):
            await pool.post("/x", b"{}", 5)
        return await pool.post("/x", b"{}", 5)  # the pool recovers on a new socket

    after, fake = asyncio.run(_serve(["close"], one))
    assert after.status == 200 and fake.connections == 2


def test_garbage_answer_is_an_http_error() -> None:
    async def one(pool):
        with pytest.raises(HttpError, match="malformed HTTP answer"):
            await pool.post("/x", b"{}", 5)
        return await pool.post("/x", b"{}", 5)

    after, _ = asyncio.run(_serve([b"SPDY/9 nonsense\r\n\r\n"], one))
    assert after.status == 200


def test_slow_answer_times_out_and_frees_its_slot() -> None:
    async def one(pool):
        with pytest.raises(asyncio.TimeoutError):
            await pool.post("/x", b"{}", 0.2)
        return await asyncio.wait_for(pool.post("/x", b"{}", 5), 3)

    after, fake = asyncio.run(_serve(["hang"], one, limit=1))
    assert after.status == 200 and fake.connections == 2


def test_no_more_sockets_than_the_limit() -> None:
    async def many(pool):
        return await asyncio.gather(*(pool.post("/x", b"{}", 5) for _ in range(40)))

    responses, fake = asyncio.run(_serve([], many, limit=3))
    assert len(responses) == 40 and fake.connections <= 3


def test_refused_connection_and_https_url() -> None:
    async def one(pool):
        with pytest.raises(HttpError, match="cannot connect"):
            await pool.post("/x", b"{}", 5)

    async def closed_port():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        await one(Http1Pool(f"http://127.0.0.1:{port}", {}, 1))

    asyncio.run(closed_port())
    with pytest.raises(ValueError, match="plain http"):
        Http1Pool("https://api.example.com", {}, 1)
