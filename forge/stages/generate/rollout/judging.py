"""Reading a judge's verdict: an integer score on the rubric's scale and its rationale, from
JSON, `Score: 8`, `**Rating:** 8/10`, `[[8]]` or a bare number. A labelled score that opens a
line beats one inside a sentence, which beats a bare fraction (a rationale may quote "2/10 of
the claims"); among equals the last wins, as judges often restate the scale before they decide."""

from __future__ import annotations

import json
import re
from typing import Any

JSON_OBJECT = re.compile(r"\{[^{}]*\}", re.S)
LABELLED = re.compile(
    r"(?:score|rating|grade|verdict)\W{0,6}(?:is|of|=|:)?\W{0,6}(-?\d+(?:\.\d+)?)(?:\s*(?:/|out of)\s*(\d+))?", re.I
)
BRACKETED = re.compile(r"\[\[\s*(-?\d+(?:\.\d+)?)\s*\]\]")
FRACTION = re.compile(r"(?<![\d.])(-?\d+(?:\.\d+)?)\s*(?:/|out of)\s*(\d+)(?!\d|\.\d)")
BARE = re.compile(r"^\W*(-?\d+(?:\.\d+)?)\W*$")
RATIONALE_KEYS = ("rationale", "reason", "reasoning", "explanation", "justification")


def _integer(value: Any, lo: int, hi: int) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if number != int(number) or not lo <= number <= hi:
        return None
    return int(number)


def parse_judgment(text: str, lo: int, hi: int) -> tuple[int | None, str]:
    """(score, rationale); score None when no integer in [lo, hi] can be read."""
    for blob in reversed(JSON_OBJECT.findall(text)):
        try:
            data = json.loads(blob)
        except ValueError:
            continue
        if isinstance(data, dict):
            key = next((k for k in data if k.lower() in ("score", "rating", "grade")), None)
            score = _integer(data.get(key), lo, hi) if key else None
            if score is not None:
                why = next((str(data[k]) for k in data if k.lower() in RATIONALE_KEYS), "")
                return score, why or _without(text, blob)
    candidates: list[tuple[int, int, int, str]] = []  # (rank, position, score, matched text)
    for pattern, rank in ((LABELLED, 2), (BRACKETED, 2), (FRACTION, 1)):
        for m in pattern.finditer(text):
            scale = m.group(2) if pattern is not BRACKETED and m.lastindex and m.lastindex >= 2 else None
            if scale is not None and int(scale) != hi:
                continue  # "4/5" on a 1-10 rubric is not this rubric's score
            score = _integer(m.group(1), lo, hi)
            if score is not None:
                line_start = text.rfind("\n", 0, m.start()) + 1
                opens_line = pattern is LABELLED and not re.search(r"\w", text[line_start : m.start()])
                candidates.append((rank + opens_line, m.start(), score, m.group(0)))
    if candidates:
        _, _, score, matched = max(candidates)
        return score, _without(text, matched)
    bare = BARE.match(text)
    if bare:
        score = _integer(bare.group(1), lo, hi)
        if score is not None:
            return score, ""
    return None, text.strip()


def _without(text: str, part: str) -> str:
    return " ".join(text.replace(part, " ").split()).strip(" .:-*")
