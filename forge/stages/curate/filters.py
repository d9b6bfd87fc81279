"""The curate stage's row filters: `curate.filters` entries built into objects with one `check(row)`.

Each entry is `{name: <filter>, <its options>..., applies_to: documents|chats|all, label: <name>}`.
`check(row)` returns None to keep the row, or a Removal (filter name, reason, the value that
failed) that the stage writes to rejected/ and counts in the stats.

Document filters are datatrove's own blocks, used as they are (`block.filter(Document)`); the
Document is built once per row and shared by every datatrove-backed filter, so datatrove's
word-split cache (keyed on the text object) tokenizes each row once for all of them. Chat
filters live in forge/stages/curate/chat_filters.py, the language filter in forge/stages/curate/langid.py.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from forge.schema import ConfigError
from forge.stages.curate.rows import ROLES, Removal, row_text

APPLIES_TO = ("documents", "chats", "all")
_ENTRY_KEYS = ("name", "applies_to", "label")


class RowFilter:
    """One configured filter. `name` is the YAML name (or the entry's `label`), used in rejected/
    and the stats; `applies_to` says which rows the stage hands it."""

    name: str = ""
    applies_to: str = "documents"

    def check(self, row: dict[str, Any]) -> Removal | None:  # pragma: no cover - interface
        raise NotImplementedError

    def batch_counts(self) -> dict[str, Any] | None:
        """Counters of this filter's own since the last call (finds per type, matches per
        benchmark), added to the batch's stats under `filters.<name>`; None: nothing to add."""
        return None

    def wants(self, row: dict[str, Any]) -> bool:
        """Whether this filter applies to `row` (chats carry `messages`, documents `text`)."""
        if self.applies_to == "all":
            return True
        is_chat = row.get("messages") is not None
        return is_chat if self.applies_to == "chats" else not is_chat

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} applies_to={self.applies_to}>"


@dataclass(frozen=True)
class FilterSpec:
    """A registry entry. `target` ("module:Class") is imported on first use only (datatrove takes
    half a second to import): a RowFilter class, or with `datatrove` a datatrove filter block used
    as it is, `measure` computing the value behind its reasons. The options are the class's
    __init__ parameters unless `options` lists them."""

    target: str
    applies_to: str = "documents"
    datatrove: bool = False
    measure: Callable[[Any, str, str], Any] | None = None
    reason: str = "removed"  # for blocks that answer a bare False (RegexFilter)
    options: tuple[str, ...] | None = None
    needs_tokenizer: bool = False

    def cls(self) -> type:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)

    def make(self, **options: Any) -> RowFilter:
        if self.datatrove:
            return DatatroveFilter(self.cls()(**options), self.measure, self.reason)
        return self.cls()(**options)

    def signature(self) -> inspect.Signature:
        return inspect.signature(self.cls())

    def option_names(self) -> tuple[str, ...]:
        if self.options is not None:
            return self.options
        skip = {"self", "tokenizer", "exclusion_writer", "batch_size"}
        params = self.signature().parameters.values()
        return tuple(p.name for p in params if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


# --- the Document shared by the datatrove-backed filters ------------------------------------------


class _LastDocument:
    """The last row's datatrove Document. forge runs every filter on one row before the next, so
    all datatrove blocks see the same Document and the same text object (datatrove caches its
    spaCy word split on the text: one tokenization per row). Keyed on the row object itself (a
    strong reference, so its id cannot be reused) and on its text/messages objects."""

    __slots__ = ("doc", "messages", "row", "text")

    def __init__(self) -> None:
        self.row: Any = None
        self.text: Any = None
        self.messages: Any = None
        self.doc: Any = None

    def get(self, row: dict[str, Any]) -> Any:
        text = row.get("text")
        messages = row.get("messages")
        if row is self.row and text is self.text and messages is self.messages:
            return self.doc
        from datatrove.data import Document

        self.doc = Document(text=row_text(row), id=row.get("id") or "")
        self.row, self.text, self.messages = row, text, messages
        if _WARMUP.rows_left:
            _WARMUP(self.doc.text)
        return self.doc


_LOCAL = threading.local()  # one last-row Document per thread, should the stage run rows in threads


def _last_document() -> _LastDocument:
    try:
        return _LOCAL.last
    except AttributeError:
        _LOCAL.last = _LastDocument()
        return _LOCAL.last


class _SpacyVocabWarmup:
    """Teach spaCy's vocabulary the words of the first rows, so datatrove's word split runs ~8x
    faster on every later row. datatrove tokenizes inside spaCy's `memory_zone()`, where each
    word spaCy has not seen outside a zone is built as a throwaway lexeme, on every row again
    (~5 ms for 300 words). Tokenizing the first `rows` rows once outside a zone (0.6 ms each)
    keeps their words, Zipf's head, for good: a few MB, the same words out. Only spaCy-backed
    languages of the configured blocks; nothing of datatrove is changed."""

    def __init__(self, rows: int = 1000, max_chars: int = 100_000) -> None:
        self.rows_left = 0
        self.budget = rows
        self.max_chars = max_chars
        self.nlps: dict[str, Any] = {}

    def add(self, language: str) -> None:
        from datatrove.utils.word_tokenizers import SpaCyTokenizer, load_word_tokenizer

        try:
            word_tokenizer = load_word_tokenizer(language)
        except ValueError:  # a language datatrove has no tokenizer for: its block will say so
            return
        if isinstance(word_tokenizer, SpaCyTokenizer) and word_tokenizer.language not in ("ja", "zh", "vi"):
            self.nlps[language] = word_tokenizer.tokenizer
            self.rows_left = self.budget

    def __call__(self, text: str) -> None:
        self.rows_left -= 1
        if len(text) <= self.max_chars:
            for nlp in self.nlps.values():
                nlp.tokenizer(text)


_WARMUP = _SpacyVocabWarmup()


def set_vocab_warmup(rows: int) -> None:
    """curate.vocab_warmup_rows: rows whose words spaCy keeps for good (0 = off); before build_filters."""
    _WARMUP.budget = max(rows, 0)
    _WARMUP.rows_left = min(_WARMUP.rows_left, _WARMUP.budget)


def _num(x: float) -> float:
    return round(float(x), 4)


class DatatroveFilter(RowFilter):
    """A datatrove filter block used as it is: `(False, reason)` becomes a Removal whose value is
    the measured quantity behind the reason (see `measure`), or the reason where none is cheap."""

    def __init__(self, block: Any, measure: Callable[[Any, str, str], Any] | None = None, reason: str = "removed"):
        self.block = block
        self._filter = block.filter
        self._measure = measure
        self.default_reason = reason
        language = getattr(block, "language", None)
        if isinstance(language, str) and language not in _WARMUP.nlps:
            _WARMUP.add(language)

    def check(self, row: dict[str, Any]) -> Removal | None:
        doc = _last_document().get(row)
        text = doc.text
        try:
            result = self._filter(doc)
        except ZeroDivisionError:  # a threshold set to 0 on an empty document
            return Removal(self.name, "empty", 0)
        finally:
            if doc.text is not text:  # C4QualityFilter rewrites doc.text; the row is never changed
                doc.text = text
        if result is True:
            return None
        if isinstance(result, tuple):
            keep, reason = result
        else:
            keep, reason = bool(result), None
        if keep:
            return None
        reason = reason or self.default_reason
        value: Any = None
        if self._measure is not None:
            try:
                value = self._measure(self.block, reason, text)
            except (ZeroDivisionError, ValueError):
                value = None
        return Removal(self.name, reason, reason if value is None else value)


# --- the measured values behind datatrove's reasons -----------------------------------------------


def _gopher_quality_value(block: Any, reason: str, text: str) -> Any:
    from datatrove.utils.text import PUNCTUATION_SET, split_into_words

    words = split_into_words(text, block.language)  # the cached split the block just made
    n_words = len(words)
    non_symbol = [w for w in words if any(ch not in PUNCTUATION_SET for ch in w)]
    lines = text.splitlines()
    if reason in ("gopher_short_doc", "gopher_long_doc"):
        return len(non_symbol)
    if reason in ("gopher_below_avg_threshold", "gopher_above_avg_threshold"):
        return _num(sum(len(w) for w in non_symbol) / len(non_symbol))
    if reason == "gopher_too_many_hashes":
        return _num(text.count("#") / n_words)
    if reason == "gopher_too_many_ellipsis":
        return _num((text.count("...") + text.count("…")) / n_words)
    if reason == "gopher_too_many_bullets":
        return _num(sum(s.lstrip().startswith(("•", "-")) for s in lines) / len(lines))
    if reason == "gopher_too_many_end_ellipsis":
        return _num(sum(s.rstrip().endswith(("...", "…")) for s in lines) / len(lines))
    if reason == "gopher_below_alpha_threshold":
        return _num(sum(any(c.isalpha() for c in w) for w in words) / n_words)
    if reason == "gopher_enough_stop_words":
        return len(block.stop_words.intersection(words))
    return None


def _gopher_repetition_value(block: Any, reason: str, text: str) -> Any:
    from datatrove.pipeline.filters.gopher_repetition_filter import (
        find_all_duplicate,
        find_duplicates,
        find_top_duplicate,
        get_n_grams,
    )
    from datatrove.utils.text import split_into_words

    if reason == "empty":
        return 0
    if reason.startswith("dup_para"):
        paragraphs = block.paragraph_exp.split(text.strip())
        dups, chars = find_duplicates(paragraphs)
        return _num(dups / len(paragraphs) if reason == "dup_para_frac" else chars / len(text))
    if reason.startswith("dup_line"):
        lines = block._line_splitter.split(text)
        dups, chars = find_duplicates(lines)
        return _num(dups / len(lines) if reason == "dup_line_frac" else chars / len(text))
    m = re.fullmatch(r"top_(\d+)_gram|duplicated_(\d+)_n_grams", reason)
    if m is None:
        return None
    words = split_into_words(text, block.language)
    if m.group(1):
        return _num(find_top_duplicate(get_n_grams(words, int(m.group(1)))) / len(text))
    return _num(find_all_duplicate(words, int(m.group(2))) / len(text))


def _fineweb_value(block: Any, reason: str, text: str) -> Any:
    from datatrove.pipeline.filters.gopher_repetition_filter import find_duplicates
    from datatrove.utils.text import split_into_words

    lines = [line for line in text.split("\n") if line.strip() != ""]
    if reason == "empty" or not lines:
        return 0
    if reason == "line_punct_ratio":
        return _num(sum(1 for line in lines if line.endswith(block.stop_chars)) / len(lines))
    if reason == "short_line_ratio":
        return _num(sum(1 for line in lines if len(line) <= block.short_line_length) / len(lines))
    if reason == "char_dup_ratio":
        return _num(find_duplicates(lines)[1] / len(text.replace("\n", "")))
    if reason == "list_ratio":
        return _num(text.count("\n") / len(split_into_words(text, block.language)))
    return None


def _c4_value(block: Any, reason: str, text: str) -> Any:
    if reason == "lorem_ipsum":
        return "lorem ipsum"
    if reason == "curly_bracket":
        return "{"
    return None  # too_few_sentences: the count needs C4's whole line pass again


def _regex_value(block: Any, reason: str, text: str) -> Any:
    m = block.regex.search(text)
    return m.group(0)[:200] if m else None


# --- filters datatrove lacks ------------------------------------------------------------------------


class KeywordsFilter(RowFilter):
    """Remove rows containing any of `words` (words or phrases), case-insensitive, as whole words
    unless whole_word is false. One compiled regex; the value is the first word found."""

    def __init__(self, words: list[str], whole_word: bool = True) -> None:
        if isinstance(words, str):
            words = [words]
        words = [str(w) for w in words if str(w).strip()]
        if not words:
            raise ValueError("words: give at least one word or phrase")
        alternation = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
        pattern = rf"(?<!\w)(?:{alternation})(?!\w)" if whole_word else f"(?:{alternation})"
        self.regex = re.compile(pattern, re.IGNORECASE)

    def check(self, row: dict[str, Any]) -> Removal | None:
        m = self.regex.search(row_text(row))
        return None if m is None else Removal(self.name, "keyword", m.group(0).lower())


class LengthFilter(RowFilter):
    """Remove rows whose text (a chat: its turns joined) has fewer than min_chars or more than
    max_chars characters; the value is the length."""

    def __init__(self, min_chars: int | None = None, max_chars: int | None = None) -> None:
        self.min_chars = min_chars
        self.max_chars = max_chars

    def check(self, row: dict[str, Any]) -> Removal | None:
        n = len(row_text(row))
        if self.min_chars is not None and n < self.min_chars:
            return Removal(self.name, "too_short", n)
        if self.max_chars is not None and n > self.max_chars:
            return Removal(self.name, "too_long", n)
        return None


# --- the registry ----------------------------------------------------------------------------------


_DT = "datatrove.pipeline.filters."
FILTERS: dict[str, FilterSpec] = {
    "gopher_quality": FilterSpec(
        _DT + "gopher_quality_filter:GopherQualityFilter", datatrove=True, measure=_gopher_quality_value
    ),
    "gopher_repetition": FilterSpec(
        _DT + "gopher_repetition_filter:GopherRepetitionFilter", datatrove=True, measure=_gopher_repetition_value
    ),
    "c4_quality": FilterSpec(_DT + "c4_filters:C4QualityFilter", datatrove=True, measure=_c4_value),
    "fineweb_quality": FilterSpec(
        _DT + "fineweb_quality_filter:FineWebQualityFilter", datatrove=True, measure=_fineweb_value
    ),
    "regex": FilterSpec(_DT + "regex_filter:RegexFilter", datatrove=True, measure=_regex_value, reason="regex"),
    "keywords": FilterSpec("forge.stages.curate.filters:KeywordsFilter"),
    "length": FilterSpec("forge.stages.curate.filters:LengthFilter", applies_to="all"),
    "chat_structure": FilterSpec("forge.stages.curate.chat_filters:ChatStructureFilter", applies_to="chats"),
    "max_turns": FilterSpec("forge.stages.curate.chat_filters:MaxTurnsFilter", applies_to="chats"),
    "role_tokens": FilterSpec(
        "forge.stages.curate.chat_filters:RoleTokensFilter", applies_to="chats", options=ROLES, needs_tokenizer=True
    ),
    "language": FilterSpec("forge.stages.curate.langid:LanguageFilter", applies_to="all"),
    "pii": FilterSpec("forge.stages.curate.pii:PiiFilter", applies_to="all"),
    "decontaminate": FilterSpec("forge.stages.curate.decontaminate:DecontaminateFilter", applies_to="all"),
}


def _plain(value: Any) -> Any:
    """OmegaConf containers to plain dicts/lists (the stage may pass either)."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


def _check_types(where: str, spec: FilterSpec, options: dict[str, Any]) -> None:
    """Catch `min_doc_words: fifty` at build time rather than on the first row: an option whose
    default is a number takes a number (or null), one whose default is a bool takes a bool."""
    if spec.options is not None:
        return
    params = spec.signature().parameters
    for key, value in options.items():
        default = params[key].default
        if default is inspect.Parameter.empty or value is None:
            continue
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: option '{key}' must be true or false (got {value!r})")
        elif isinstance(default, (int, float)) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}: option '{key}' must be a number (got {value!r})")


def build_filters(entries: list[dict], tokenizer: str | None, key: str = "curate.filters") -> list[RowFilter]:
    """The configured filters, in order. Raises ConfigError naming the entry for an unknown filter,
    an unknown or missing option, a bad value, or a tokenizer-needing filter without a tokenizer."""
    entries = _plain(entries) or []
    if not isinstance(entries, list):
        raise ConfigError(f"{key}: must be a list of {{name: <filter>, <options>...}} (got {type(entries).__name__})")
    built: list[RowFilter] = []
    used: dict[str, str] = {}
    tokenizer_key = key.rsplit(".", 1)[0] + ".tokenizer" if "." in key else "tokenizer"
    for i, entry in enumerate(entries):
        here = f"{key}[{i}]"
        entry = _plain(entry)
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{here}: must be a mapping with a `name` (got {entry!r})")
        name = entry["name"]
        spec = FILTERS.get(name)
        if spec is None:
            close = difflib.get_close_matches(name, FILTERS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{here}: unknown filter '{name}'{hint}; known: {', '.join(sorted(FILTERS))}")
        where = f"{here} ({name})"
        allowed = spec.option_names()
        options = {k: v for k, v in entry.items() if k not in _ENTRY_KEYS}
        for opt in options:
            if opt not in allowed:
                close = difflib.get_close_matches(str(opt), allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"{where}: unknown option '{opt}'{hint}; options: {', '.join(allowed) or '(none)'}")
        if spec.options is None:
            for p in spec.signature().parameters.values():
                if p.default is inspect.Parameter.empty and p.name in allowed and p.name not in options:
                    raise ConfigError(f"{where}: missing option '{p.name}'")
        _check_types(where, spec, options)
        applies_to = entry.get("applies_to", spec.applies_to)
        if applies_to not in APPLIES_TO:
            raise ConfigError(f"{where}: applies_to must be one of {', '.join(APPLIES_TO)} (got {applies_to!r})")
        label = entry.get("label", name)
        if not isinstance(label, str) or not label:
            raise ConfigError(f"{where}: label must be a non-empty string (got {label!r})")
        if label in used:
            raise ConfigError(
                f"{where}: the name '{label}' is already used by {used[label]}; give one of them a `label`"
            )
        if spec.needs_tokenizer:
            if not tokenizer:
                raise ConfigError(
                    f"{where}: needs a tokenizer to count tokens; set {tokenizer_key} "
                    "(or model.tokenizer / model.name_or_path)"
                )
            options["tokenizer"] = tokenizer
        try:
            f = spec.make(**options)
        except ConfigError:
            raise
        except (TypeError, ValueError, re.error, OSError, ImportError) as e:
            raise ConfigError(f"{where}: {e}") from e
        f.name = label
        f.applies_to = applies_to
        used[label] = here
        built.append(f)
    return built
