"""A TEST DOUBLE of the OpenAI Batch API (files + batches endpoints) for the batch engine's tests.
No local engine implements batches, and a real provider cannot be made to expire a batch, fail
part of it or take its time on demand. Every request of a batch is answered by the REAL CPU
engine (each JSONL line's body is POSTed to it); the double adds only the batch life cycle and
the injected faults:

- `delay_s`: a batch stays `in_progress` this long before it is worked on (slow completion);
- `fail_once`: prompts (last user message) answered 500 the first time they are in a batch;
- `refuse`: prompts answered 400 (the request's own fault);
- `expire_after`: the first batch stops after this many requests and ends `expired`.

It binds 127.0.0.1 on a free port, runs in a daemon thread, and counts batches and the requests
it sent to the engine per prompt.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter
from typing import Any

import orjson
from aiohttp import web
from threaded_app import ThreadedApp


def last_user(body: dict[str, Any]) -> str:
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    return str(users[-1].get("content")) if users else ""


class BatchServer(ThreadedApp):
    name = "batch server"
    session_timeout_s = 300.0

    def __init__(
        self,
        upstream: str,
        delay_s: float = 0.0,
        fail_once: set[str] | None = None,
        refuse: set[str] | None = None,
        expire_after: int | None = None,
    ) -> None:
        super().__init__()
        self.upstream = upstream.rstrip("/")
        self.delay_s = delay_s
        self.fail_once = set(fail_once or ())
        self.refuse = set(refuse or ())
        self.expire_after = expire_after
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.sent: Counter = Counter()  # prompt -> requests the engine answered
        self.failed: set[str] = set()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # --- the API ------------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        async with self._session.get(f"{self.upstream}/v1/models") as resp:
            return web.Response(status=resp.status, body=await resp.read(), content_type="application/json")

    async def _upload(self, request: web.Request) -> web.Response:
        reader = await request.multipart()
        purpose, data = None, b""
        async for part in reader:
            if part.name == "purpose":
                purpose = (await part.read()).decode()
            elif part.name == "file":
                data = await part.read()
        if purpose != "batch" or not data:
            return web.json_response({"error": {"message": "purpose=batch and a file are required"}}, status=400)
        file_id = f"file-{next(self._ids)}"
        self.files[file_id] = data
        return web.json_response({"id": file_id, "object": "file", "bytes": len(data), "purpose": "batch"})

    async def _content(self, request: web.Request) -> web.Response:
        data = self.files.get(request.match_info["file_id"])
        if data is None:
            return web.json_response({"error": {"message": "no such file"}}, status=404)
        return web.Response(body=data, content_type="application/jsonl")

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("input_file_id") not in self.files or body.get("endpoint") != "/v1/chat/completions":
            return web.json_response({"error": {"message": "bad input_file_id or endpoint"}}, status=400)
        batch_id = f"batch_{next(self._ids)}"
        batch = {"id": batch_id, "object": "batch", "status": "validating", "input_file_id": body["input_file_id"],
                 "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}}  # fmt: skip
        self.batches[batch_id] = batch
        asyncio.ensure_future(self._work(batch, len(self.batches) == 1))
        return web.json_response(batch)

    async def _get(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return web.json_response({"error": {"message": "no such batch"}}, status=404)
        return web.json_response(batch)

    # --- the work -----------------------------------------------------------------------------

    async def _answer_all(self, items: list[tuple[str, dict[str, Any]]], first: bool) -> list[tuple[str, int, Any]]:
        """(custom id, status, OpenAI chat body or error) for each (custom id, chat body) the batch
        gets to (an expiring first batch stops early), each answered by the real engine."""
        await asyncio.sleep(self.delay_s)
        limit = self.expire_after if first and self.expire_after is not None else len(items)
        sem = asyncio.Semaphore(8)

        async def one(cid: str, body: dict[str, Any]) -> tuple[str, int, Any]:
            prompt = last_user(body)
            if prompt in self.refuse:
                return cid, 400, {"error": {"message": "refused by the batch double"}}
            with self._lock:
                fail = prompt in self.fail_once and prompt not in self.failed
                if fail:
                    self.failed.add(prompt)
            if fail:
                return cid, 500, {"error": {"message": "server error (batch double)"}}
            async with sem, self._session.post(f"{self.upstream}/v1/chat/completions", json=body) as resp:
                answer = await resp.json()
            with self._lock:
                self.sent[prompt] += 1
            return cid, resp.status, answer

        return list(await asyncio.gather(*(one(cid, body) for cid, body in items[:limit])))

    async def _work(self, batch: dict[str, Any], first: bool) -> None:
        lines = [orjson.loads(x) for x in self.files[batch["input_file_id"]].splitlines() if x.strip()]
        batch["request_counts"]["total"] = len(lines)
        batch["status"] = "in_progress"
        answered = await self._answer_all([(x["custom_id"], x["body"]) for x in lines], first)
        results = [{"id": f"req-{next(self._ids)}", "custom_id": cid, "response": {"status_code": status, "body": body},
                    "error": None} for cid, status, body in answered]  # fmt: skip
        ok = [r for r in results if r["response"]["status_code"] == 200]
        bad = [r for r in results if r["response"]["status_code"] != 200]
        for key, part in (("output_file_id", ok), ("error_file_id", bad)):
            if part:
                file_id = f"file-{next(self._ids)}"
                self.files[file_id] = b"".join(orjson.dumps(r) + b"\n" for r in part)
                batch[key] = file_id
        batch["request_counts"].update(completed=len(ok), failed=len(bad))
        batch["status"] = "expired" if len(answered) < len(lines) else "completed"

    # --- Anthropic's Message Batches ------------------------------------------------------------

    async def _create_messages(self, request: web.Request) -> web.Response:
        if request.headers.get("anthropic-version") is None or request.headers.get("x-api-key") is None:
            return web.json_response({"type": "error", "error": {"type": "authentication_error"}}, status=401)
        requests = (await request.json())["requests"]
        batch_id = f"msgbatch_{next(self._ids)}"
        counts = {"processing": len(requests), "succeeded": 0, "errored": 0, "expired": 0}
        batch = {"id": batch_id, "type": "message_batch", "processing_status": "in_progress", "results_url": None,
                 "request_counts": counts}  # fmt: skip
        self.batches[batch_id] = batch
        asyncio.ensure_future(self._work_messages(batch, requests, len(self.batches) == 1))
        return web.json_response(batch)

    async def _work_messages(self, batch: dict[str, Any], requests: list[dict[str, Any]], first: bool) -> None:
        def chat(params: dict[str, Any]) -> dict[str, Any]:
            system = [{"role": "system", "content": params["system"]}] if params.get("system") else []
            return {
                "model": params["model"],
                "messages": [*system, *params["messages"]],
                "max_tokens": params["max_tokens"],
            }

        answered = {cid: (status, body) for cid, status, body in
                    await self._answer_all([(r["custom_id"], chat(r["params"])) for r in requests], first)}  # fmt: skip
        lines, counts = [], batch["request_counts"]
        for r in requests:
            cid = r["custom_id"]
            if cid not in answered:
                lines.append({"custom_id": cid, "result": {"type": "expired"}})
                counts["expired"] += 1
                continue
            status, body = answered[cid]
            if status == 200:
                choice, usage = body["choices"][0], body.get("usage") or {}
                message = {"id": f"msg_{next(self._ids)}", "type": "message", "role": "assistant",
                           "content": [{"type": "text", "text": choice["message"].get("content") or ""}],
                           "stop_reason": "max_tokens" if choice.get("finish_reason") == "length" else "end_turn",
                           "usage": {"input_tokens": usage.get("prompt_tokens", 0),
                                     "output_tokens": usage.get("completion_tokens", 0)}}  # fmt: skip
                lines.append({"custom_id": cid, "result": {"type": "succeeded", "message": message}})
                counts["succeeded"] += 1
            else:
                kind = "invalid_request_error" if status < 500 else "api_error"
                error = {"type": "error", "error": {"type": kind, "message": body["error"]["message"]}}
                lines.append({"custom_id": cid, "result": {"type": "errored", "error": error}})
                counts["errored"] += 1
        counts["processing"] = 0
        file_id = f"file-{next(self._ids)}"
        self.files[file_id] = b"".join(orjson.dumps(x) + b"\n" for x in lines)
        batch["results_url"] = f"{self.url}/v1/messages/batches/{batch['id']}/results?file={file_id}"
        batch["processing_status"] = "ended"

    async def _messages_results(self, request: web.Request) -> web.Response:
        return web.Response(body=self.files[request.query["file"]], content_type="application/x-jsonl")

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024**2)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{file_id}/content", self._content)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches/{batch_id}", self._get)
        app.router.add_post("/v1/messages/batches", self._create_messages)
        app.router.add_get("/v1/messages/batches/{batch_id}", self._get)
        app.router.add_get("/v1/messages/batches/{batch_id}/results", self._messages_results)
        return app
