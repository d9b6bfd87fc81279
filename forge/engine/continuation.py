"""Prompt token ids for a conversation that continues an earlier answer of this process, so that
the engine's prefix cache serves the earlier prompt and answer.

A rollout step such as "revise" sends [user, assistant: draft, user: revise]. Rendering that to
text and tokenizing it again gives token ids that need not equal the ones the engine produced
for the draft (a model's tokens do not always round-trip through text; random-weight models'
almost never do), so the prefix cache would miss from the draft on and the engine would prefill
it again. Here the new prompt is built as: the earlier prompt's ids + the answer's own ids + the
ids of what the chat template adds after them. The template decides: when the rendered new
conversation does not start with the earlier prompt and answer as text (a template that drops
earlier reasoning, say), the prompt is tokenized from its text as usual.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson

DEFAULT_MAX_TOKENS = 16_000_000  # remembered ids (4 bytes each) and their text: about 130 MB at most


def conversation_key(messages: list[dict[str, Any]], answer: str) -> bytes:
    return hashlib.blake2b(orjson.dumps([messages, answer]), digest_size=16).digest()


class Continuations:
    """Remembers, per answered conversation, the ids of its prompt and answer (least recently used
    dropped first past `max_tokens`), and builds continuing prompts from them."""

    def __init__(
        self, render: Callable[[list[dict[str, Any]]], str], encode: Callable[[str], list[int]], max_tokens: int = 0
    ) -> None:
        self.render = render
        self.encode = encode
        self.max_tokens = max_tokens or DEFAULT_MAX_TOKENS
        self.entries: OrderedDict[bytes, tuple[array, str]] = OrderedDict()
        self.tokens = 0
        self.reused = 0  # prompts built on an earlier answer
        self.reused_tokens = 0  # ids taken over, not tokenized again

    def prompt_ids(self, messages: list[dict[str, Any]]) -> tuple[list[int], str]:
        """(ids, rendered text) of the prompt for `messages`."""
        text = self.render(messages)
        for j in range(len(messages) - 1, 0, -1):
            answer = messages[j]
            if answer.get("role") != "assistant" or not isinstance(answer.get("content"), str):
                continue
            entry = self.entries.get(conversation_key(messages[:j], answer["content"]))
            if entry is None:
                continue
            ids, earlier = entry
            if not text.startswith(earlier):  # the template renders the earlier turns otherwise
                break
            self.entries.move_to_end(conversation_key(messages[:j], answer["content"]))
            self.reused += 1
            self.reused_tokens += len(ids)
            return [*ids, *self.encode(text[len(earlier) :])], text
        return self.encode(text), text

    def remember(
        self,
        messages: list[dict[str, Any]],
        prompt_text: str,
        prompt_ids: list[int],
        answer: str,
        answer_ids: list[int],
        stopped_on_token: bool,
    ) -> None:
        """Keep the ids of `messages` answered with `answer`. stopped_on_token: the last answer id is
        the stop token (EOS or one of stop_token_ids), which the template writes itself after the
        content, so it is left out. An answer cut by a stop string is not kept (its ids run past
        its text)."""
        ids = array("i", prompt_ids)
        ids.extend(answer_ids[:-1] if stopped_on_token and answer_ids else answer_ids)
        key = conversation_key(messages, answer)
        old = self.entries.pop(key, None)
        if old is not None:
            self.tokens -= len(old[0])
        self.entries[key] = (ids, prompt_text + answer)
        self.tokens += len(ids)
        while self.tokens > self.max_tokens and len(self.entries) > 1:
            _, (dropped, _) = self.entries.popitem(last=False)
            self.tokens -= len(dropped)
