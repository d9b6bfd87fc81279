"""The `language` filter: offline language ID with py3langid, whose model ships inside its wheel
(py3langid/data/model.npz.xz): nothing is downloaded, ever.

Probabilities are calibrated (`norm_probs=True`: a softmax at temperature sqrt(bytes)), so
`min_score` means the same thing for a tweet and for a page.
"""

from __future__ import annotations

import threading
from typing import Any

from forge.stages.curate.filters import RowFilter
from forge.stages.curate.rows import Removal, row_text

_LOCK = threading.Lock()
_IDENTIFIER: Any = None


def identifier() -> Any:
    """The one py3langid identifier of this process (0.7 s to load; shared by every filter)."""
    global _IDENTIFIER
    if _IDENTIFIER is None:
        with _LOCK:
            if _IDENTIFIER is None:
                from py3langid.langid import MODEL_FILE, LanguageIdentifier

                _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


def detect(text: str, max_chars: int | None = None) -> tuple[str, float]:
    """(ISO 639-1 code, calibrated probability) of `text`'s language, over every language the model knows."""
    if max_chars and len(text) > max_chars:
        text = text[:max_chars]
    lang, score = identifier().classify(text)
    return lang, float(score)


class LanguageFilter(RowFilter):
    """Keep rows whose detected language is one of `languages` with probability >= `min_score`.

    Reasons: wrong_language / low_language_score; the value is "<lang>:<score>" ("fr:0.9731").
    `max_chars`: classify only the first that many characters (language ID is a per-byte walk
    in Python; 4000 characters are plenty). A chat is classified on its turns' text joined.
    """

    def __init__(self, languages: list[str] | str = "en", min_score: float = 0.65, max_chars: int | None = 4000):
        if isinstance(languages, str):
            languages = [languages]
        languages = [str(code).lower() for code in languages]
        if not languages:
            raise ValueError("languages: give at least one ISO 639-1 code, e.g. [en]")
        known = set(identifier().labels)
        unknown = [code for code in languages if code not in known]
        if unknown:
            raise ValueError(f"languages: unknown code {unknown[0]!r}; known: {', '.join(sorted(known))}")
        if not 0.0 <= float(min_score) <= 1.0:
            raise ValueError(f"min_score: must be in [0, 1] (got {min_score})")
        self.languages = frozenset(languages)
        self.min_score = float(min_score)
        self.max_chars = max_chars

    def check(self, row: dict[str, Any]) -> Removal | None:
        lang, score = detect(row_text(row), self.max_chars)
        if lang not in self.languages:
            return Removal(self.name, "wrong_language", f"{lang}:{score:.4f}")
        if score < self.min_score:
            return Removal(self.name, "low_language_score", f"{lang}:{score:.4f}")
        return None
