"""The `pii` curate filter: find emails, phone numbers, IP addresses, credit cards, IBANs and
secret-shaped strings (API keys, tokens, private keys) in a row's text or chat turns, and redact
them with typed placeholders (`[EMAIL]`) or quarantine the row.

The detectors are forge's own, offline and without a model: one regex per type finds candidates,
and a validator throws out what only looks like one (a card number must pass the Luhn checksum
and carry a card network's prefix, an IBAN its country's length and the mod-97 check, an IP
address four octets of at most 255, a phone number the `phonenumbers` library's validity rules
(Google's libphonenumber metadata, shipped in the wheel), a generic `key = value` secret enough
entropy). datatrove's PIIFormatter finds emails and IPv4 only, and replaces them with other,
real-looking addresses; forge's placeholders say what was there.

A quick check skips the regexes of a type whose tell-tale character is absent (no `@`: no email),
so clean text costs a few `in` tests; card, IBAN and phone regexes run only where 7 digits are
close together.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from forge.stages.curate.filters import RowFilter
from forge.stages.curate.rows import Removal

TYPES = ("email", "phone", "ip", "credit_card", "iban", "secret")
ACTIONS = ("redact", "quarantine")

EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b"
)
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
PHONE = re.compile(r"(?<![\w+(])(?:\+|00)?\(?\d[\d ().\-/]{5,20}\d(?!\w)")
SECRET = re.compile(
    "|".join(
        [
            r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z]+ )*PRIVATE KEY-----",
            r"\bAKIA[0-9A-Z]{16}\b",  # AWS access key id
            r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}\b",  # GitHub tokens
            r"\bgithub_pat_[A-Za-z0-9_]{22,}\b",
            r"\bglpat-[A-Za-z0-9_-]{20}(?![\w-])",  # GitLab
            r"\bxox[abposr]-[A-Za-z0-9-]{10,}(?![\w-])",  # Slack
            r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}(?![\w-])",  # OpenAI / Anthropic
            r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}\b",  # Stripe
            r"\bhf_[A-Za-z0-9]{30,}\b",  # Hugging Face
            r"\bAIza[0-9A-Za-z_-]{35}(?![\w-])",  # Google API key
            r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWT
            r"\bnpm_[A-Za-z0-9]{36}\b",
        ]
    )
)
# `password = "..."`, `api_key: ...`, `Authorization: Bearer ...`: the value only, when it looks random
ASSIGNED_SECRET = re.compile(
    r"(?i)(?:api[_-]?key|apikey|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|token|password|passwd|pwd"
    r"|bearer)[\"']?\s*(?:[:=]|\s)\s*[\"']?([A-Za-z0-9_\-+/=.~]{16,})"
)

# IBAN length per country (the SWIFT registry)
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "BY": 28,
    "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19,
    "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_network(digits: str) -> bool:
    """A prefix and length some card network issues (Visa, Mastercard, Amex, Discover, JCB,
    Diners, UnionPay, Maestro): a Luhn-valid 16-digit order number is not a card."""
    n, p2, p4 = len(digits), int(digits[:2]), int(digits[:4])
    if digits[0] == "4":
        return n in (13, 16, 19)
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16
    if p2 in (34, 37):
        return n == 15
    if digits.startswith(("6011", "65")) or 644 <= int(digits[:3]) <= 649:
        return 16 <= n <= 19
    if 3528 <= p4 <= 3589:
        return 16 <= n <= 19
    if p2 in (36, 38, 39) or 300 <= int(digits[:3]) <= 305:
        return 14 <= n <= 19
    if p2 == 62:
        return 16 <= n <= 19
    return p2 in (50, 56, 57, 58, 63, 67) and 12 <= n <= 19


def iban_ok(candidate: str) -> bool:
    code = candidate.replace(" ", "")
    if IBAN_LENGTHS.get(code[:2]) != len(code):
        return False
    moved = code[4:] + code[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


def ip_ok(candidate: str, public_only: bool) -> bool:
    """A valid address; never loopback or unspecified (127.0.0.1, 0.0.0.0, ::1: code samples);
    with public_only, only globally routable ones (datatrove's choice)."""
    try:
        ip = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    if ip.is_loopback or ip.is_unspecified:
        return False
    return ip.is_global if public_only else True


def entropy(value: str) -> float:
    """Shannon entropy in bits per character: a random key has > 3.5, a word or path much less."""
    counts = Counter(value)
    return -sum(c / len(value) * math.log2(c / len(value)) for c in counts.values())


def random_looking(value: str) -> bool:
    """A value that looks generated: letters and digits, high entropy, not a path or a placeholder."""
    if value.count("/") >= 2 or value.startswith(("/", "./", "~")):
        return False
    if any(word in value.lower() for word in PLACEHOLDER_WORDS):
        return False
    has_digit = any(ch.isdigit() for ch in value)
    has_alpha = any(ch.isalpha() for ch in value)
    return has_digit and has_alpha and entropy(value) >= 3.5


Span = tuple[int, int, str]  # start, end, type


class PiiFinder:
    """The spans of PII in a text, by type; overlapping finds keep the earliest, then the longest."""

    def __init__(
        self,
        types: list[str] | tuple[str, ...] = TYPES,
        regions: tuple[str, ...] = ("US", "GB", "DE", "FR"),
        public_ips_only: bool = False,
    ) -> None:
        self.types = tuple(types)
        self.regions = regions
        self.public_ips_only = public_ips_only
        self.finders: list[tuple[str, Callable[[str], list[Span]]]] = [
            (t, getattr(self, f"_{t}"))
            for t in ("secret", "email", "iban", "credit_card", "ip", "phone")
            if t in self.types
        ]

    def spans(self, text: str) -> list[Span]:
        found: list[Span] = []
        digits = None
        for kind, find in self.finders:
            if kind in ("credit_card", "iban", "phone"):
                if digits is None:
                    digits = SEVEN_DIGITS.search(text) is not None
                if not digits:
                    continue
            found += find(text)
        if len(found) < 2:
            return found
        found.sort(key=lambda s: (s[0], -(s[1] - s[0])))
        out: list[Span] = []
        for span in found:
            if out and span[0] < out[-1][1]:
                continue
            out.append(span)
        return out

    def _email(self, text: str) -> list[Span]:
        if "@" not in text:
            return []
        found = EMAIL.finditer(text)
        return [(m.start(), m.end(), "email") for m in found if m.group().rsplit(".", 1)[1].lower() not in FILE_TLDS]

    def _ip(self, text: str) -> list[Span]:
        out: list[Span] = []
        if "." in text:
            for m in IPV4.finditer(text):
                if VERSION_BEFORE.search(text, max(0, m.start() - 12), m.start()):  # 1.2.3.4 is a version
                    continue
                if ip_ok(m.group(), self.public_ips_only):
                    out.append((m.start(), m.end(), "ip"))
        if "::" in text or text.count(":") >= 5:
            for m in IPV6.finditer(text):
                if any(ch.isdigit() for ch in m.group()):  # `Abc::Def` (C++, Perl) is no address
                    if ip_ok(m.group(), self.public_ips_only):
                        out.append((m.start(), m.end(), "ip"))
        return out

    def _credit_card(self, text: str) -> list[Span]:
        out: list[Span] = []
        for m in CARD.finditer(text):
            digits = re.sub(r"[ -]", "", m.group())
            if luhn_ok(digits) and card_network(digits):
                out.append((m.start(), m.end(), "credit_card"))
        return out

    def _iban(self, text: str) -> list[Span]:
        """The country's IBAN length decides where it ends (the regex may run on into a word in
        capitals after it: `DE89 3704 0044 0532 0130 00 OK`)."""
        out: list[Span] = []
        for m in IBAN.finditer(text):
            want = IBAN_LENGTHS.get(m.group()[:2])
            if want is None:
                continue
            taken, end = 0, m.start()
            for i, ch in enumerate(m.group()):
                if ch != " ":
                    taken += 1
                if taken == want:
                    end = m.start() + i + 1
                    break
            if taken == want and iban_ok(text[m.start() : end]):
                out.append((m.start(), end, "iban"))
        return out

    def _phone(self, text: str) -> list[Span]:
        out: list[Span] = []
        for m in PHONE.finditer(text):
            raw = m.group()
            if 7 <= sum(ch.isdigit() for ch in raw) <= 15 and _phone_shaped(raw) and valid_phone(raw, self.regions):
                out.append((m.start(), m.end(), "phone"))
        return out

    def _secret(self, text: str) -> list[Span]:
        out = []
        if any(tell in text for tell in SECRET_TELLS):
            out = [(m.start(), m.end(), "secret") for m in SECRET.finditer(text)]
        lowered = text.lower()
        if any(key in lowered for key in SECRET_KEYS):
            for m in ASSIGNED_SECRET.finditer(text):
                if random_looking(m.group(1)):
                    out.append((m.start(1), m.end(1), "secret"))
        return out


@lru_cache(maxsize=65536)
def valid_phone(raw: str, regions: tuple[str, ...]) -> bool:
    """A number libphonenumber calls valid: international (+, 00) as it is, else in one of `regions`."""
    import phonenumbers

    international = raw.startswith(("+", "00"))
    for region in (None,) if international else regions:
        try:
            number = phonenumbers.parse("+" + raw[2:] if raw.startswith("00") else raw, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return True
    return False


VERSION_BEFORE = re.compile(r"(?i)(?:version|release|section|§|\bv)\s*$")
DATE_LIKE = re.compile(r"^\d{1,4}[./-]\d{1,2}[./-]\d{1,4}$")
COORDINATES = re.compile(r"\d\.\d+(?:\s*,\s*|\s+)-?\d+\.\d")
YEAR = re.compile(r"(?:19|20)\d\d")
SEVEN_DIGITS = re.compile(r"\d(?:[ ().\-/]{0,2}\d){6}")  # cards, IBANs and phone numbers all have 7+ digits
SECRET_TELLS = ("AKIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "glpat-", "xox", "sk-", "sk_")
SECRET_TELLS += ("rk_", "pk_", "hf_", "AIza", "eyJ", "npm_", "-----BEGIN")
SECRET_KEYS = ("key", "secret", "token", "passw", "pwd", "bearer")
PLACEHOLDER_WORDS = ("your", "here", "example", "xxxx", "changeme", "placeholder", "dummy", "redacted")
FILE_TLDS = {"png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "ico", "pdf", "zip"}


def _phone_shaped(raw: str) -> bool:
    """Not a date (2024-01-15), a decimal or a range of years: a phone number is digits grouped by
    spaces, dashes, dots or parentheses, or one run of 10+ digits, or starts with +."""
    if DATE_LIKE.match(raw) or COORDINATES.search(raw):
        return False
    if raw.startswith(("+", "00", "(")):
        return True
    groups = [g for g in re.split(r"[ ().\-/]+", raw) if g]
    if len(groups) > 1:
        if len(groups[0]) == 1 or len(groups[-1]) == 1:  # ISBN-10 (0-306-40615-2), "8 336 817"
            return False
        if len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:]) and " " in raw and "-" not in raw:
            return False  # thousands grouped with spaces: 1 234 567 890
        if YEAR.fullmatch(groups[0]) or any(len(g) >= 8 for g in groups):  # 2024 0115 1230, 20240115 1200
            return False
    if raw.count(".") >= 3:  # 192.0.2.1 2001: an address, not a number
        return False
    if len(groups) == 1:  # one run of digits: a North American number (area code 2-9), maybe after a 1;
        # not a Unix time (1712345678)
        return (len(raw) == 10 and raw[0] in "23456789") or (len(raw) == 11 and raw[0] == "1" and raw[1] in "23456789")
    return "." not in raw or raw.count(".") >= 2


class PiiFilter(RowFilter):
    """`{name: pii, action: redact | quarantine, types: [...], placeholder: "[{type}]"}`.

    redact: each find is replaced by the placeholder (`[EMAIL]`, `[PHONE]`, `[IP]`,
    `[CREDIT_CARD]`, `[IBAN]`, `[SECRET]`) in the text, or in every chat turn's content,
    reasoning and tool calls; the row is kept, and the raw rows other filters send to rejected/
    are redacted there too. quarantine: a row with any find goes to rejected/ with the types
    and counts (never the values). Either way the stats count the finds per type.
    public_ips_only: private, documentation and link-local addresses stay too (datatrove's
    default); loopback and unspecified ones (127.0.0.1, 0.0.0.0) always stay.
    phone_regions: the countries whose national formats are read without a +."""

    def __init__(
        self,
        action: str = "redact",
        types: list[str] | None = None,
        placeholder: str = "[{type}]",
        public_ips_only: bool = False,
        phone_regions: list[str] | None = None,
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"action: {action!r}; one of {', '.join(ACTIONS)}")
        types = list(TYPES if types is None else ([types] if isinstance(types, str) else types))
        unknown = [t for t in types if t not in TYPES]
        if unknown:
            raise ValueError(f"types: unknown {unknown}; known: {', '.join(TYPES)}")
        if "{type}" not in placeholder:
            raise ValueError(f"placeholder: {placeholder!r} must contain {{type}}")
        self.action = action
        self.placeholder = placeholder
        regions = tuple(phone_regions or ("US", "GB", "DE", "FR"))
        self.finder = PiiFinder(types, regions, public_ips_only)
        self.found: Counter[str] = Counter()
        self.rows_with_pii = 0

    def _redact(self, text: str, found: Counter[str]) -> str:
        spans = self.finder.spans(text)
        if not spans:
            return text
        parts, at = [], 0
        for start, end, kind in spans:
            parts += [text[at:start], self.placeholder.format(type=kind.upper())]
            found[kind] += 1
            at = end
        parts.append(text[at:])
        return "".join(parts)

    def redact_text(self, text: str | None) -> str | None:
        """`text` redacted without counting (a rejected row's value, under action=redact)."""
        return None if text is None else self._redact(text, Counter())

    def redact_value(self, value: Any, found: Counter[str] | None = None) -> Any:
        """Every string inside a decoded value (a raw record, parsed tool calls) redacted."""
        found = Counter() if found is None else found
        if isinstance(value, str):
            return self._redact(value, found)
        if isinstance(value, list):
            return [self.redact_value(v, found) for v in value]
        if isinstance(value, dict):
            return {k: self.redact_value(v, found) for k, v in value.items()}
        return value

    def _redact_json(self, text: str, found: Counter[str]) -> str:
        """Tool calls are JSON text: its decoded strings are redacted (in JSON, a newline is the
        two characters `\\n`, which would hide what follows from the detectors), then re-encoded."""
        try:
            decoded = json.loads(text)
        except ValueError:
            return self._redact(text, found)
        return json.dumps(self.redact_value(decoded, found), ensure_ascii=False)

    def check(self, row: dict[str, Any]) -> Removal | None:
        found: Counter[str] = Counter()
        if row.get("text") is not None:
            text = self._redact(row["text"], found)
            if found and self.action == "redact":
                row["text"] = text
        else:
            messages = row.get("messages") or []
            redacted = []
            for m in messages:
                m = dict(m)
                for key in ("content", "reasoning"):
                    if isinstance(m.get(key), str) and m[key]:
                        m[key] = self._redact(m[key], found)
                if isinstance(m.get("tool_calls"), str) and m["tool_calls"]:
                    m["tool_calls"] = self._redact_json(m["tool_calls"], found)
                redacted.append(m)
            if found and self.action == "redact":
                row["messages"] = redacted
        if not found:
            return None
        self.found.update(found)
        self.rows_with_pii += 1
        if self.action == "quarantine":
            return Removal(self.name, "contains_pii", dict(sorted(found.items())))
        return None

    def batch_counts(self) -> dict[str, Any] | None:
        """Finds per type since the last call (the stage adds them to the batch's stats)."""
        if not self.rows_with_pii:
            return None
        out = {"rows_with_pii": self.rows_with_pii, "found": dict(self.found)}
        self.found = Counter()
        self.rows_with_pii = 0
        return out
