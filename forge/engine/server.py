"""Engine processes: start on a free port, wait until /v1/models answers, restart after a
crash, and never outlive forge (own process group, killed with it; SIGKILL on parent death)."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import Any

import aiohttp

from forge.config import EngineKind, ModelConfig
from forge.engine.commands import build_command

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
    """A server someone else runs; the key is read from the env var named by model.api_key_env."""

    kind = EngineKind.endpoint

    def __init__(self, model: ModelConfig) -> None:
        super().__init__(model, model.served_name or model.name_or_path)
        self.base_url = normalize_base_url(model.endpoint_url or "")
        if model.api_key_env:
            key = os.environ.get(model.api_key_env)
            if not key:
                raise EngineError(f"model.api_key_env names ${model.api_key_env}, which is not set in the environment")
            self.api_key = key

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

    def _spawn(self) -> None:
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self.command = build_command(self.model, self.model_path, port, self.seed)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logfile:
            logfile.write(f"\n=== forge: starting {' '.join(self.command)}\n".encode())
            logfile.flush()
            parent = os.getpid()
            self.proc = subprocess.Popen(
                self.command,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._env(),
                preexec_fn=lambda: _die_with_parent(parent),
            )
        log.info("engine pid %d: %s", self.proc.pid, " ".join(self.command))

    async def start(self) -> None:
        t0 = time.monotonic()
        log.info("starting %s engine for %s (log: %s)", self.kind.value, self.model_path, self.log_path)
        try:
            self._spawn()
        except FileNotFoundError as exc:
            raise EngineError(f"model.engine={self.kind.value}: cannot run {exc.filename!r}; is it installed?") from exc
        deadline = t0 + self.model.startup_timeout_s
        next_note = t0 + 30
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while True:
                code = self.proc.poll()
                if code is not None:
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


def open_engine(model: ModelConfig, model_path: str, log_path: Path, seed: int | None = None) -> Engine:
    """The Engine for model.engine (not started yet)."""
    if model.engine == EngineKind.endpoint:
        return Endpoint(model)
    if model.engine == EngineKind.vllm_async:
        from forge.engine.inprocess import VllmInProcess

        return VllmInProcess(model, model_path, seed)
    return LocalServer(model, model_path, log_path, seed)
