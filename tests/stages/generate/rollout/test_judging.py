"""The judge's verdict is read from the shapes judges really write; anything else is no score."""

from __future__ import annotations

import pytest

from forge.stages.generate.rollout.judging import parse_judgment


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("Score: 8\nRationale: correct and clear.", 8),
        ("**Rating:** 7/10 — mostly right.", 7),
        ('{"score": 9, "rationale": "complete"}', 9),
        ('```json\n{"Score": "6", "reason": "ok"}\n```', 6),
        ("The answer deserves [[4]].", 4),
        ("I would give it 3 out of 10.", 3),
        ("On a scale of 1 to 10 ... after reflection, Score: 2", 2),  # the last verdict wins
        ("10", 10),
        ("  5.  ", 5),
        ("Score: 11", None),  # off the scale
        ("Score: 7.5", None),  # not an integer
        ("It is a 4/5 answer.", None),  # another scale
        ("no verdict here", None),
        ("", None),
        ("Score: 8\nRationale: only 2/10 of the claims hold.", 8),  # a labelled line beats a fraction
        ("Score: 8\nRationale: the grade is 5 points below par.", 8),  # and a label inside a sentence
    ],
)
def test_scores(text: str, score: int | None) -> None:
    assert parse_judgment(text, 1, 10)[0] == score


def test_rationale_is_the_text_without_the_score() -> None:
    score, why = parse_judgment("Score: 8\nRationale: correct and clear.", 1, 10)
    assert score == 8 and why == "Rationale: correct and clear"
    assert parse_judgment('{"score": 3, "explanation": "wrong unit"}', 1, 10) == (3, "wrong unit")


def test_other_scales() -> None:
    assert parse_judgment("Score: 4/5", 1, 5)[0] == 4
    assert parse_judgment("Score: 0", 0, 1)[0] == 0
