"""An example of a user's rollout: three dependent steps — translate, translate back, and check
the round trip with the judge (judge_model when set, else the model) — with a setup that runs once
per task. Run it from this directory:

    cd examples && forge rollout.fn=my_pkg.rollouts:translate_and_check +rollout.options.language=French

Every generate call is cached on its own, so a killed run replays finished steps and sends only
the missing ones; an exception here quarantines the row with its step, never the task."""

from __future__ import annotations

from typing import Any


def setup(ctx: Any) -> dict[str, Any]:
    """Once per task: what every row shares (here, the target language and a glossary)."""
    return {"language": ctx.options.get("language", "French"), "glossary": {"photosynthesis": "photosynthèse"}}


async def translate_and_check(row: dict[str, Any], generate: Any, ctx: Any) -> dict[str, Any]:
    language = ctx.state["language"]
    source = ctx.messages(row)[-1]["content"]
    forward = await generate(
        f"Translate into {language}. Reply with the translation only.\n\n{source}", step="translate"
    )
    back = await generate(
        f"Translate into English. Reply with the translation only.\n\n{forward.text}", step="translate back"
    )
    verdict = await generate(
        f"Do these two texts mean the same? Answer yes or no.\n\nA: {source}\n\nB: {back.text}",
        model="judge",
        step="check",
        max_tokens=8,
    )
    return {
        "source": source,
        "translation": forward.text,
        "back_translation": back.text,
        "faithful": verdict.text.strip().lower().startswith("yes"),
        "language": language,
    }
