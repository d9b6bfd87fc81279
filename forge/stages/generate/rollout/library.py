"""The ready rollouts (conf/rollout/*.yaml; their prompts live in those files). Each is a plain
rollout function — the same shape a user writes — and declares the knobs it reads (`uses`), the
prompts it needs and the types of the columns it returns."""

from __future__ import annotations

import asyncio
from typing import Any

import pyarrow as pa

from forge.run.output import MESSAGE
from forge.stages.generate.rollout.calls import StepFailed
from forge.stages.generate.rollout.columns import FORGES
from forge.stages.generate.rollout.judging import parse_judgment

MESSAGES = pa.list_(MESSAGE)
# the columns of the draft -> critique -> revise rollouts
REVISED = {
    "messages": MESSAGES,
    "draft": pa.string(),
    "critiques": pa.list_(pa.string()),
    "revisions": pa.list_(pa.string()),
    "text": pa.string(),
}


def _ready(uses: tuple[str, ...], prompts: tuple[str, ...], columns: dict[str, Any]) -> Any:
    def mark(fn: Any) -> Any:
        fn.uses, fn.prompts, fn.columns = uses, prompts, columns
        return fn

    return mark


def json_field(name: str, taken: Any) -> str:
    """A JSON schema field's column: its name, or `json_<name>` where that name is taken."""
    return f"json_{name}" if name in taken or name in FORGES else name


def transcript(messages: list[dict[str, Any]]) -> str:
    """A conversation as plain text for a judge or critic prompt."""
    if len(messages) == 1:
        return str(messages[0].get("content") or "")
    return "\n\n".join(f"{m.get('role', 'user').upper()}: {m.get('content') or ''}" for m in messages)


@_ready((), (), {"messages": MESSAGES, "text": pa.string(), "reasoning": pa.string()})
async def chat(row: dict[str, Any], generate: Any, ctx: Any) -> dict[str, Any]:
    """One request per sample (today's behaviour); with generation.json_schema the answer's
    fields become columns (a field named like one of these or like forge's own columns gets a
    `json_` prefix)."""
    messages = ctx.messages(row)
    answer = await generate(messages, step="answer")
    out: dict[str, Any] = {"messages": messages, "text": answer.text, "reasoning": answer.reasoning}
    if isinstance(answer.parsed, dict):
        out.update({json_field(k, out): v for k, v in answer.parsed.items()})
    elif answer.parsed is not None:
        out["json"] = answer.parsed
    return out


async def score_answer(
    generate: Any, ctx: Any, conversation: list[dict[str, Any]], answer: str, step: str
) -> tuple[int | None, str, str]:
    """(score, rationale, the judge's raw text), asking again up to rollout.parse_retries times."""
    r = ctx.cfg
    prompt = ctx.render(
        "judge", question=transcript(conversation), answer=answer, score_min=r.score_min, score_max=r.score_max
    )
    text = ""
    for _ in range(1 + r.parse_retries):
        verdict = await generate([{"role": "user", "content": prompt}], model="judge", step=step, json_schema=None)
        text = verdict.text
        score, rationale = parse_judgment(text, r.score_min, r.score_max)
        if score is not None:
            return score, rationale, text
    return None, "", text


def conversation_of(row: dict[str, Any], ctx: Any) -> list[dict[str, Any]]:
    """The prompt a row was answered with: its `messages` (a forge run dir), else the prompt column."""
    messages = row.get("messages")
    if isinstance(messages, list) and messages:
        return [{"role": m.get("role"), "content": m.get("content")} for m in messages]
    return ctx.messages(row)


@_ready(
    ("score_min", "score_max", "answer_column", "parse_retries"),
    ("judge",),
    {
        "messages": MESSAGES,
        "text": pa.string(),
        "score": pa.int64(),
        "rationale": pa.string(),
        "judge_text": pa.string(),
    },
)
async def judge(row: dict[str, Any], generate: Any, ctx: Any) -> dict[str, Any]:
    """Score an existing answer (rollout.answer_column) with the rubric in rollout.prompts.judge."""
    column = ctx.cfg.answer_column
    answer = row.get(column)
    if not isinstance(answer, str):
        have = ", ".join(sorted(row)) or "none"
        raise KeyError(f"rollout.answer_column: the row has no text column {column!r} (its columns: {have})")
    conversation = conversation_of(row, ctx)
    score, rationale, raw = await score_answer(generate, ctx, conversation, answer, "judge")
    if score is None:
        r = ctx.cfg
        raise StepFailed(
            "judge",
            f"the judge's answer holds no integer score in [{r.score_min}, {r.score_max}] after "
            f"{1 + r.parse_retries} attempt(s)",
            answer=raw,
        )
    return {"messages": conversation, "text": answer, "score": score, "rationale": rationale, "judge_text": raw}


@_ready(
    ("rounds",),
    ("critique", "revise"),
    REVISED,
)
async def critique_revise(row: dict[str, Any], generate: Any, ctx: Any) -> dict[str, Any]:
    """Draft, then rollout.rounds x (critique by judge_model, or the model; revise by the model)."""
    messages = ctx.messages(row)
    draft = await generate(messages, step="draft")
    answer, critiques, revisions = draft.text, [], []
    question = transcript(messages)
    for n in range(1, ctx.cfg.rounds + 1):
        critique = await generate(
            ctx.render("critique", question=question, answer=answer),
            model="judge",
            step=f"critique {n}",
            json_schema=None,  # generation.json_schema shapes the answer, not the critique
        )
        revise = ctx.render("revise", critique=critique.text)
        turns = [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": revise}]
        revised = await generate(turns, step=f"revise {n}")
        critiques.append(critique.text)
        revisions.append(revised.text)
        answer = revised.text
    return {"messages": messages, "draft": draft.text, "critiques": critiques, "revisions": revisions, "text": answer}


@_ready(
    ("rounds",),
    ("critique", "revise"),
    {**REVISED, "conversation": MESSAGES},
)
async def self_refine(row: dict[str, Any], generate: Any, ctx: Any) -> dict[str, Any]:
    """Draft, then rollout.rounds x (critique, revise), all by the model in one growing
    conversation: each step's prompt is the previous step's prompt and answer plus one user turn.
    An engine with a prefix cache (vLLM's default) then prefills only the new turn, where
    critique_revise's separate critic prompt prefills the draft again; on vllm_async forge sends
    the earlier answers' own token ids, so the cache hits even when text would not round-trip
    (forge/engine/continuation.py). `conversation` keeps every turn."""
    messages = ctx.messages(row)
    conversation = list(messages)
    draft = await generate(list(conversation), step="draft")
    conversation.append({"role": "assistant", "content": draft.text})
    answer, critiques, revisions = draft.text, [], []
    for n in range(1, ctx.cfg.rounds + 1):
        conversation.append({"role": "user", "content": ctx.render("critique")})
        # generation.json_schema shapes the answer, not the critique
        critique = await generate(list(conversation), step=f"critique {n}", json_schema=None)
        conversation += [
            {"role": "assistant", "content": critique.text},
            {"role": "user", "content": ctx.render("revise")},
        ]
        revised = await generate(list(conversation), step=f"revise {n}")
        conversation.append({"role": "assistant", "content": revised.text})
        critiques.append(critique.text)
        revisions.append(revised.text)
        answer = revised.text
    return {
        "messages": messages,
        "draft": draft.text,
        "critiques": critiques,
        "revisions": revisions,
        "text": answer,
        "conversation": conversation,
    }


@_ready(("turns",), ("user_simulator",), {"messages": MESSAGES, "num_turns": pa.int64()})
async def multi_turn(row: dict[str, Any], generate: Any, ctx: Any) -> dict[str, Any]:
    """The assistant and a user simulator (the same model with rollout.prompts.user_simulator as
    its system prompt, roles swapped) talk for rollout.turns assistant turns."""
    conversation = ctx.messages(row)
    system = [m for m in conversation if m["role"] == "system"]
    for turn in range(1, ctx.cfg.turns + 1):
        answer = await generate(conversation, step=f"assistant turn {turn}")
        conversation.append({"role": "assistant", "content": answer.text})
        if turn == ctx.cfg.turns:
            break
        swapped = [
            {"role": "assistant" if m["role"] == "user" else "user", "content": m["content"]}
            for m in conversation
            if m["role"] != "system"
        ]
        persona = ctx.render("user_simulator", task=transcript(system) if system else "")
        # strict chat templates want a user turn first: the simulator's view opens with one
        opening = {"role": "user", "content": "(You start the conversation.)"}
        user = await generate(
            [{"role": "system", "content": persona}, opening, *swapped], step=f"user turn {turn + 1}", json_schema=None
        )
        conversation.append({"role": "user", "content": user.text})
    return {"messages": conversation, "num_turns": ctx.cfg.turns}


@_ready(
    ("n", "score_min", "score_max", "parse_retries"),
    ("judge",),
    {
        "messages": MESSAGES,
        "text": pa.string(),
        "candidate": pa.int64(),
        "score": pa.int64(),
        "rationale": pa.string(),
        "chosen": pa.bool_(),
    },
)
async def best_of_n(row: dict[str, Any], generate: Any, ctx: Any) -> list[dict[str, Any]]:
    """rollout.n samples (sampled at generation.temperature, 1.0 when unset), each scored by the
    judge; all n are kept with their scores and `chosen` marks the best (the first on a tie; none
    when the judge scored none)."""
    messages = ctx.messages(row)
    temperature = ctx.generation.temperature if ctx.generation.temperature is not None else 1.0
    samples = await asyncio.gather(
        *(generate(messages, temperature=temperature, step=f"sample {i + 1}") for i in range(ctx.cfg.n))
    )
    verdicts = await asyncio.gather(
        *(score_answer(generate, ctx, messages, s.text, f"judge sample {i + 1}") for i, s in enumerate(samples))
    )
    scored = [(v[0], -i) for i, v in enumerate(verdicts) if v[0] is not None]
    best = -max(scored)[1] if scored else None
    return [
        {
            "messages": messages,
            "text": s.text,
            "candidate": i,
            "score": v[0],
            "rationale": v[1] if v[0] is not None else f"unscored: {v[2][:200]}",
            "chosen": i == best,
        }
        for i, (s, v) in enumerate(zip(samples, verdicts, strict=True))
    ]
