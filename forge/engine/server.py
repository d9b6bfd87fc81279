"""Engine processes: start on a free port, wait until /v1/models answers, restart after a
crash, and never outlive forge (own process group, killed with it; SIGKILL on parent death)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import aiohttp

from forge.engine.commands import build_command, missing_engine_message
from forge.engine.config import EngineKind, ModelConfig
from forge.io.secrets import redact_command, redact_text

log = logging.getLogger("forge.engine")
_PR_SET_PDEATHSIG = 1


class EngineError(RuntimeError):
    """The engine could not start, or died more often than model.max_restarts allows."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child before exec: own session, and SIGKILL when forge dies (even by -9)."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux/glibc: the process group kill in stop() still applies
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def pump_log(stream: Any, path: Path) -> None:
    """Copy the engine's output into its log line by line, secrets masked (an engine may print
    its own arguments, an API key among them). Keeps draining even when the log cannot be
    written (disk full), so the engine never blocks on a full pipe."""
    out = None
    with contextlib.suppress(OSError):
        out = open(path, "ab", buffering=0)
    with stream:
        for raw in iter(stream.readline, b""):
            if out is None:
                continue
            try:
                out.write(redact_text(raw.decode("utf-8", "replace")).encode())
            except OSError:
                with contextlib.suppress(OSError):
                    out.close()
                out = None
    if out is not None:
        with contextlib.suppress(OSError):
            out.close()


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines)).rstrip()
    except OSError:
        return "(no log)"


def normalize_base_url(url: str) -> str:
    """`http://h:8000/v1/` -> `http://h:8000`: forge appends /v1/... itself (never /v1/v1)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class Engine:
    """An OpenAI-compatible server that requests go to. Subclasses decide how it comes to be."""

    kind: EngineKind

    def __init__(self, model: ModelConfig, served_model: str) -> None:
        self.model = model
        self.served_model = served_model
        self.base_url = ""
        self.api_key: str | None = None
        self.startup_s: float | None = None
        self.ready_at: float | None = None
        self.restarts = 0
        self.reported_max_model_len: int | None = None
        self._ready = asyncio.Event()
        self._fatal: EngineError | None = None

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        self._ready.clear()

    async def wait_ready(self) -> None:
        """Block while the engine (re)starts; raise if it is gone for good."""
        await self._ready.wait()
        if self._fatal:
            raise self._fatal

    def is_ready(self) -> bool:
        return self._ready.is_set() and self._fatal is None

    def graph_cap(self) -> int | None:
        """Largest batch the engine runs as a CUDA graph (vLLM's default for `vllm serve`)."""
        from forge.engine.capacity import VLLM_GRAPH_CAP

        return VLLM_GRAPH_CAP if self.kind == EngineKind.vllm else None

    async def kv_capacity_tokens(self) -> int | None:
        """KV-cache capacity in tokens, where the engine reports it (vLLM's /metrics)."""
        if self.kind not in (EngineKind.vllm,) or not self.base_url:
            return None
        from forge.engine.capacity import kv_tokens_from_metrics

        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                async with session.get(f"{self.base_url}/metrics") as resp:
                    return kv_tokens_from_metrics(await resp.text()) if resp.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None

    async def _probe(self, session: aiohttp.ClientSession) -> dict[str, Any] | None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            async with session.get(f"{self.base_url}/v1/models", headers=headers) as resp:
                if resp.status in (401, 403):
                    raise EngineError(f"{self.base_url} rejected the API key (HTTP {resp.status})")
                if resp.status != 200:
                    return None
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None

    def _note_models(self, listing: dict[str, Any]) -> None:
        for entry in listing.get("data") or []:
            if isinstance(entry, dict) and entry.get("max_model_len"):
                self.reported_max_model_len = int(entry["max_model_len"])


class Endpoint(Engine):
    """A server someone else runs; the key is read from the env var named by model.api_key_env.
    A local server usually needs none: with that variable unset, requests carry no Authorization."""

    kind = EngineKind.endpoint

    def __init__(self, model: ModelConfig) -> None:
        super().__init__(model, model.served_name or model.name_or_path)
        self.base_url = normalize_base_url(model.endpoint_url or "")
        key = os.environ.get(model.api_key_env) if model.api_key_env else None
        if key:
            self.api_key = key
        elif model.api_key_env:
            log.info(
                "$%s (model.api_key_env) is not set: sending requests to %s without an Authorization header",
                model.api_key_env,
                self.base_url,
            )

    async def start(self) -> None:
        t0 = time.monotonic()
        deadline = t0 + min(self.model.startup_timeout_s, 120)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                listing = await self._probe(session)
                if listing is not None:
                    break
                if time.monotonic() > deadline:
                    raise EngineError(f"model.endpoint_url: {self.base_url}/v1/models did not answer 200")
                await asyncio.sleep(1.0)
        self._note_models(listing)
        self.startup_s = time.monotonic() - t0
        self.ready_at = time.monotonic()
        self._ready.set()


class LocalServer(Engine):
    """A server process forge owns: vllm serve, sglang, or transformers serve."""

    def __init__(self, model: ModelConfig, model_path: str, log_path: Path, seed: int | None) -> None:
        served = model_path if model.engine == EngineKind.transformers else (model.served_name or model.name_or_path)
        super().__init__(model, served)
        self.kind = model.engine
        self.model_path = model_path
        self.log_path = log_path
        self.seed = seed
        self.proc: subprocess.Popen | None = None
        self._stopping = False
        self._supervisor: asyncio.Task | None = None
        self._pump: threading.Thread | None = None
        self.command: list[str] = []

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if Path(self.model_path).exists():
            env.setdefault("HF_HUB_OFFLINE", "1")
        if self.kind == EngineKind.transformers:
            # transformers serve answers /v1/models with 500 unless its hub cache dir exists
            cache = Path(env.get("HF_HUB_CACHE") or Path.home() / ".cache" / "huggingface" / "hub")
            cache.mkdir(parents=True, exist_ok=True)
            env["HF_HUB_CACHE"] = str(cache)
        return env

    def is_ready(self) -> bool:
        """Not ready the moment the process is gone: a request refused by a dead engine then waits
        for the restart instead of spending its retries (and its row) before the supervisor looks."""
        if self._fatal is None and self.proc is not None and not self._stopping and self.proc.poll() is not None:
            self._ready.clear()
        return super().is_ready()

    def _spawn(self) -> None:
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self.command = build_command(self.model, self.model_path, port, self.seed)
        exe = self.command[0]
        if not (os.path.isfile(exe) or shutil.which(exe)):
            raise FileNotFoundError(2, "No such file", exe)
        shown = redact_command(self.command)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logfile:
            logfile.write(f"\n=== forge: starting {shown}\n".encode())
        parent = os.getpid()
        # the guard leads the engine's process group and takes all of it down if forge dies
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "forge.engine.guard", "--", *self.command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**self._env(), "FORGE_PARENT_PID": str(parent)},
            preexec_fn=lambda: _die_with_parent(parent),
        )
        self._pump = threading.Thread(target=pump_log, args=(self.proc.stdout, self.log_path), daemon=True)
        self._pump.start()
        log.info("engine pid %d: %s", self.proc.pid, shown)

    async def start(self) -> None:
        t0 = time.monotonic()
        log.info("starting %s engine for %s (log: %s)", self.kind.value, self.model_path, self.log_path)
        if self.kind == EngineKind.sglang and importlib.util.find_spec("sglang") is None:
            raise EngineError(missing_engine_message(self.kind, "sglang"))
        try:
            self._spawn()
        except FileNotFoundError as exc:
            raise EngineError(missing_engine_message(self.kind, str(exc.filename))) from None
        deadline = t0 + self.model.startup_timeout_s
        next_note = t0 + 30
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while True:
                code = self.proc.poll()
                if code is not None:
                    if self._pump:  # its last lines are the reason
                        await asyncio.to_thread(self._pump.join, 5)
                    raise EngineError(
                        f"{self.kind.value} engine exited with code {code} during start-up; "
                        f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                    )
                listing = await self._probe(session)
                if listing is not None:
                    break
                now = time.monotonic()
                if now > deadline:
                    self._kill()
                    raise EngineError(
                        f"{self.kind.value} engine not ready after {self.model.startup_timeout_s:.0f} s "
                        f"(model.startup_timeout_s); last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                    )
                if now > next_note:
                    log.info("still waiting for the engine (%.0f s so far)", now - t0)
                    next_note = now + 30
                await asyncio.sleep(0.25)
        self._note_models(listing)
        elapsed = time.monotonic() - t0
        if self.startup_s is None:
            self.startup_s = elapsed
        self.ready_at = self.ready_at or time.monotonic()
        log.info("engine ready in %.1f s at %s", elapsed, self.base_url)
        self._ready.set()
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        """Restart the server if it dies mid-run; requests wait on readiness meanwhile."""
        while not self._stopping:
            await asyncio.sleep(0.5)
            if self._stopping or self.proc is None or self.proc.poll() is None:
                continue
            self._ready.clear()
            code = self.proc.returncode
            self._kill()  # leftovers of its process group
            if self.restarts >= self.model.max_restarts:
                self._fatal = EngineError(
                    f"engine died (exit code {code}) and model.max_restarts={self.model.max_restarts} "
                    f"restarts are used up; last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
                self._ready.set()
                return
            self.restarts += 1
            log.warning("engine died (exit code %s); restart %d of %d", code, self.restarts, self.model.max_restarts)
            try:
                await self.start()
            except EngineError as exc:
                self._fatal = exc
                self._ready.set()
                return

    def _kill(self) -> None:
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                self.proc.wait(timeout=10 if sig == signal.SIGTERM else 5)
                # the leader is gone; children may still be draining
                if sig == signal.SIGTERM:
                    try:
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                break
            except subprocess.TimeoutExpired:
                continue

    async def stop(self) -> None:
        self._stopping = True
        await super().stop()
        if self._supervisor:
            self._supervisor.cancel()
        await asyncio.to_thread(self._kill)
