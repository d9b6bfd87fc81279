"""The small local sources of conf/dataset/mix_tiny.yaml, one per input shape, each with a few
planted broken rows: `python -m forge.stages.curate.tiny_mix DIR` writes them (deterministic; the copy
bundled in forge/data/mix_tiny/ is this output, and a test checks that it still is)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so what out up more about into than them can "
    "only other time new some could these two may first then do any like my now over such our man me even most "
    "made after also did many before must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come since against"
).split()
SUBJECTS = ["math", "code", "science", "history"]
LEVELS = ["easy", "medium", "hard"]


def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def _paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(_sentence(rng, rng.randint(8, 18)) for _ in range(sentences))


def _openai(rng: random.Random, i: int) -> dict:
    q, a = _paragraph(rng, 1), _paragraph(rng, rng.randint(2, 4))
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if i % 5 == 0:
        messages[1]["reasoning_content"] = _paragraph(rng, 1)
    if i % 7 == 0:
        call = {"id": f"call_{i}", "type": "function", "function": {"name": "search", "arguments": '{"q": "x"}'}}
        messages[1:] = [
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": _sentence(rng, 6), "tool_call_id": f"call_{i}"},
            {"role": "assistant", "content": a},
        ]
    return {"id": f"oa-{i}", "messages": messages, "correct": rng.random() < 0.7, "subject": rng.choice(SUBJECTS)}


def _sharegpt(rng: random.Random, i: int) -> dict:
    turns = []
    for _ in range(rng.randint(1, 3)):
        turns += [{"from": "human", "value": _paragraph(rng, 1)}, {"from": "gpt", "value": _paragraph(rng, 2)}]
    return {"conversation_id": f"sg-{i}", "conversations": turns, "pass_rate": round(rng.random(), 3)}


def _pairs(rng: random.Random, i: int) -> dict:
    return {
        "question": _paragraph(rng, 1),
        "answer": _paragraph(rng, rng.randint(1, 3)),
        "level": rng.choice(LEVELS),
        "subject": "math",
    }


def _harmony(rng: random.Random, i: int) -> dict:
    text = (
        f"<|start|>user<|message|>{_paragraph(rng, 1)}<|end|>"
        f"<|start|>assistant<|channel|>analysis<|message|>{_paragraph(rng, 1)}<|end|>"
        f"<|start|>assistant<|channel|>final<|message|>{_paragraph(rng, 2)}<|return|>"
    )
    return {"id": f"hm-{i}", "text": text}


def _document(rng: random.Random, i: int) -> dict:
    return {"id": f"doc-{i}", "text": "\n\n".join(_paragraph(rng, rng.randint(3, 6)) for _ in range(rng.randint(3, 6)))}


SHAPES = {"openai": _openai, "sharegpt": _sharegpt, "pairs": _pairs, "harmony": _harmony, "documents": _document}
BROKEN = {
    "openai": ['{"id": "oa-bad-json", "messages": [', '{"id": "oa-not-list", "messages": "hello"}'],
    "sharegpt": ['{"conversation_id": "sg-bad-role", "conversations": [{"from": "robot", "value": "hi"}]}'],
    "pairs": ['{"question": "what?", "answer": null, "level": "easy"}'],
    "harmony": ['{"id": "hm-bad", "text": "<|start|>user<|message|>never closed"}'],
    "documents": ['{"id": "doc-short", "text": "too short"}', "not json at all"],
}


def write_tiny_mix(directory: Path, rows: int = 120, seed: int = 0) -> list[Path]:
    """One jsonl per shape with `rows` good rows and the BROKEN rows spread among them."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in SHAPES.items():
        rng = random.Random(f"{seed}:{name}")
        lines = [json.dumps(make(rng, i), sort_keys=True) for i in range(rows)]
        for j, bad in enumerate(BROKEN[name]):
            lines.insert((j + 1) * rows // (len(BROKEN[name]) + 1), bad)
        path = directory / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "data" / "mix_tiny"
    for p in write_tiny_mix(out):
        print(p)
