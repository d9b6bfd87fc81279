"""Anthropic's Message Batches (`model=anthropic_batch`): the batch life cycle of
forge/engine/batch.py (gathering, state, resume by polling, resubmission, quarantine) over
/v1/messages/batches. forge's requests are OpenAI chat bodies; here they become Messages API
params (system turns -> `system`, `stop` -> `stop_sequences`, parameters the Messages API lacks
dropped), and each result comes back as an OpenAI-shaped line, so the rest of forge sees one format.
"""

from __future__ import annotations

from typing import Any

import orjson

from forge.engine.batch import BatchClient, BatchEndpoint
from forge.engine.config import EngineKind

API_VERSION = "2023-06-01"
PARAMS = ("temperature", "top_p", "top_k", "metadata")  # passed as they are
STOPS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}


class AnthropicBatchEndpoint(BatchEndpoint):
    kind = EngineKind.anthropic_batch

    async def start(self) -> None:
        """Nothing to probe: Anthropic's API answers the first batch call (a bad key stops the run there)."""
        import time

        self.startup_s = 0.0
        self.ready_at = time.monotonic()
        self._ready.set()


def to_params(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat body as Messages API params."""
    system = [str(m.get("content") or "") for m in body["messages"] if m.get("role") == "system"]
    turns = [
        {"role": m["role"], "content": m.get("content") or ""} for m in body["messages"] if m.get("role") != "system"
    ]
    params: dict[str, Any] = {"model": body["model"], "max_tokens": body.get("max_tokens") or 1024, "messages": turns}
    if system:
        params["system"] = "\n\n".join(system)
    params.update({k: body[k] for k in PARAMS if body.get(k) is not None})
    if body.get("stop"):
        params["stop_sequences"] = list(body["stop"]) if isinstance(body["stop"], list) else [body["stop"]]
    return params


def to_openai(item: dict[str, Any]) -> dict[str, Any] | None:
    """One result line as OpenAI's {custom_id, response: {status_code, body}}; None for a request
    the batch did not do (expired, canceled): it is sent again."""
    result = item.get("result") or {}
    kind = result.get("type")
    if kind == "succeeded":
        message = result.get("message") or {}
        blocks = message.get("content") or []
        text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
        thinking = "".join(b.get("thinking", "") for b in blocks if b.get("type") == "thinking") or None
        usage = message.get("usage") or {}
        cached = int(usage.get("cache_read_input_tokens") or 0)
        prompt = int(usage.get("input_tokens") or 0) + cached + int(usage.get("cache_creation_input_tokens") or 0)
        body = {
            "id": message.get("id"),
            "choices": [
                {
                    "message": {"role": "assistant", "content": text, "reasoning_content": thinking},
                    "finish_reason": STOPS.get(message.get("stop_reason"), message.get("stop_reason") or "unknown"),
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": int(usage.get("output_tokens") or 0),
                "prompt_tokens_details": {"cached_tokens": cached},
            },
        }
        return {"custom_id": item["custom_id"], "response": {"status_code": 200, "body": body}}
    if kind == "errored":
        error = (result.get("error") or {}).get("error") or result.get("error") or {}
        status = 400 if error.get("type") == "invalid_request_error" else 500
        return {"custom_id": item["custom_id"], "response": {"status_code": status, "body": {"error": error}}}
    return None


class AnthropicBatchClient(BatchClient):
    max_bytes = 250 * 1024 * 1024  # Anthropic's limit is 256 MB per batch

    def headers(self) -> dict[str, str]:
        key = {"x-api-key": self.engine.api_key} if self.engine.api_key else {}
        return {**key, "anthropic-version": API_VERSION}

    async def _create(self, ids: list[str], bodies: list[bytes]) -> str:
        requests = [
            {"custom_id": cid, "params": to_params(orjson.loads(raw))} for cid, raw in zip(ids, bodies, strict=True)
        ]
        created = await self._call("POST", "/v1/messages/batches", json={"requests": requests})
        return created["id"]

    async def _poll(self, batch_id: str) -> tuple[str, bool, dict[str, Any]]:
        info = await self._call("GET", f"/v1/messages/batches/{batch_id}")
        status = info.get("processing_status", "?")
        return status, status == "ended", info

    async def _results(self, info: dict[str, Any]) -> bytes:
        if not info.get("results_url"):
            return b""
        raw = await self._call("GET", info["results_url"], raw=True)
        lines = (to_openai(orjson.loads(x)) for x in raw.splitlines() if x.strip())
        return b"".join(orjson.dumps(x) + b"\n" for x in lines if x is not None)
