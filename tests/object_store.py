"""The tests' object store: a real S3-compatible server (moto's server mode, `moto_server`, in
its own process), and in front of it FaultyStore, a TEST DOUBLE used only to inject the faults
a real store cannot produce on demand: 500s, slow answers, a denied write, an upload that hangs
(to kill -9 forge in the middle of it). Without a fault set it forwards every request unchanged.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# long enough to be masked (forge masks values of 4+ characters); never real credentials
KEY_ID = "FORGETESTKEYID7Q2XW9"
SECRET = "forgeTestSecret/7q2Xw9Lk4Mn8Pb3Vc6Zr1Ty5Ua0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Fault:
    """Answer `status` (or wait `delay_s` first, then forward) to requests of `method` whose path
    matches `path` (a regex), at most `times` times (None: until cleared)."""

    method: str | None = None
    path: str = ""
    status: int | None = None
    delay_s: float = 0.0
    drop: bool = False  # after the delay, close the connection unanswered (an upload that never lands)
    times: int | None = None
    fired: int = 0
    hit: threading.Event = field(default_factory=threading.Event)

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        return (self.method is None or self.method == method) and re.search(self.path, path) is not None


ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
    403: ("AccessDenied", "Access Denied"),
}


class FaultyStore:
    """A forwarding proxy to the S3 server, with faults to inject (see the module docstring)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        store = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                store._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any  # noqa: N815 (http.server's names)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:  # noqa: ANN001
                pass  # a client killed with -9 mid-request (the point of some tests)

        self.server = Server(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def inject(self, **kwargs: object) -> Fault:
        fault = Fault(**kwargs)  # type: ignore[arg-type]
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.requests.append((method, path))
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.fired += 1
                    return fault
        return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            try:
                body = _read_chunked(h.rfile)
            except ValueError:  # the client went away mid-body
                h.close_connection = True
                return
        if len(body) < length:
            # the client went away mid-upload (kill -9): S3 stores nothing (IncompleteBody); moto
            # would store the bytes it got, so the cut request is not forwarded
            h.close_connection = True
            return
        fault = self._take(h.command, h.path)
        if fault is not None:
            fault.hit.set()
            if fault.delay_s:
                time.sleep(fault.delay_s)
            if fault.drop:
                h.close_connection = True
                return
            if fault.status:
                code, message = ERRORS.get(fault.status, ("Error", "injected"))
                xml = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
                h.send_response(fault.status)
                h.send_header("Content-Type", "application/xml")
                h.send_header("Content-Length", str(len(xml)))
                h.end_headers()
                if h.command != "HEAD":
                    h.wfile.write(xml)
                return
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=120)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("transfer-encoding", "content-length")}
        headers["Content-Length"] = str(len(body))
        conn.request(h.command, h.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "content-length", "connection", "server", "date"):
                h.send_header(k, v)
        # a HEAD's length is the object's, not that of its (empty) body
        length = resp.getheader("Content-Length") if h.command == "HEAD" else None
        h.send_header("Content-Length", length or str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
        conn.close()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _read_chunked(rfile) -> bytes:  # noqa: ANN001
    out = b""
    while True:
        size = int(rfile.readline().strip().split(b";")[0], 16)
        if size == 0:
            rfile.readline()
            return out
        out += rfile.read(size)
        rfile.readline()


class ObjectStore:
    """moto_server in a subprocess and a FaultyStore in front; `env` points forge at it."""

    def __init__(self, log_dir: Path) -> None:
        self.s3_port = free_port()
        self.log = log_dir / "moto.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.s3_port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.s3_port}/moto-api/", timeout=2)
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto_server did not start:\n{self.log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        self.faults = FaultyStore(self.s3_port)
        self.env = {
            "AWS_ENDPOINT_URL": self.faults.url,
            "AWS_ACCESS_KEY_ID": KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self._n = 0

    def fs(self):  # noqa: ANN201
        """An s3fs client straight to the server (no faults), for the tests' own checks."""
        import s3fs

        return s3fs.S3FileSystem(
            key=KEY_ID, secret=SECRET, endpoint_url=f"http://127.0.0.1:{self.s3_port}", skip_instance_cache=True
        )

    def bucket(self, prefix: str = "b") -> str:
        """A new empty bucket's name."""
        self._n += 1
        name = f"{prefix}-{os.getpid()}-{self._n}-{int(time.time() * 1000) % 100000}"
        self.fs().mkdir(name)
        return name

    def stop(self) -> None:
        self.faults.stop()
        self.proc.kill()
        self.proc.wait()


# ---- helpers of the object-store tests: inputs on the store, a remote run dir read back
def put_parquet(fs, path: str, rows: list[dict], row_group_size: int = 64) -> None:  # noqa: ANN001
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=row_group_size)
    fs.pipe(path, buf.getvalue())


def put_jsonl(fs, path: str, rows: list[dict]) -> None:  # noqa: ANN001
    fs.pipe(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def remote_rows(fs, run: str, sub: str = "data") -> list[dict]:  # noqa: ANN001
    rows: list[dict] = []
    fs.invalidate_cache()
    for path in sorted(fs.glob(f"{run}/{sub}/*.parquet")):
        rows += pq.read_table(io.BytesIO(fs.cat_file(path))).to_pylist()
    return rows


def remote_files(fs, run: str) -> list[str]:  # noqa: ANN001
    fs.invalidate_cache()
    return sorted(p[len(run) + 1 :] for p in fs.find(run))


def assert_no_secret_in_bucket(fs, bucket: str, *streams: str) -> None:  # noqa: ANN001
    """Neither credential in any object of the bucket nor in the given streams."""
    fs.invalidate_cache()
    for path in fs.find(bucket):
        blob = fs.cat_file(path)
        for secret in (SECRET, KEY_ID):
            assert secret.encode() not in blob, f"a credential was written to s3://{path}"
    for text in streams:
        for secret in (SECRET, KEY_ID):
            assert secret not in (text or ""), "a credential was printed"


def once(ids: list[str]) -> None:
    dup = [k for k, n in Counter(ids).items() if n > 1]
    assert not dup, f"duplicated: {dup[:5]}"
