"""A planted PII set: texts with known PII of every type among decoys that only look like PII
(dates, versions, order numbers, Luhn-failing card numbers, ISBNs, hashes), for the tests and
benchmarks/pii.py to measure precision and recall on. Deterministic for a seed."""

from __future__ import annotations

import ipaddress
import random
import string

from forge.stages.curate.pii import IBAN_LENGTHS

FILLER = (
    "The committee met on Tuesday to review the quarterly figures and agreed to postpone the vote "
    "until the next session, when the full report from the regional offices will be available."
).split()


def _luhn_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def card(rng: random.Random) -> str:
    prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("37", 15), ("6011", 16), ("3530", 16)])
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    digits = body + _luhn_digit(body)
    if length == 15:
        return f"{digits[:4]} {digits[4:10]} {digits[10:]}"
    sep = rng.choice([" ", "-", ""])
    return sep.join(digits[i : i + 4] for i in range(0, 16, 4))


def bad_card(rng: random.Random) -> str:
    good = card(rng).replace(" ", "").replace("-", "")
    last = str((int(good[-1]) + 1) % 10)
    return good[:-1] + last


def iban(rng: random.Random) -> str:
    country = rng.choice(["DE", "GB", "FR", "NL", "ES", "IT", "BE", "CH"])
    n = IBAN_LENGTHS[country] - 4
    if country in ("GB", "NL"):
        bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) + "".join(
            rng.choice(string.digits) for _ in range(n - 4)
        )
    else:
        bban = "".join(rng.choice(string.digits) for _ in range(n))
    moved = bban + country + "00"
    check = 98 - int("".join(str(int(ch, 36)) for ch in moved)) % 97
    code = f"{country}{check:02d}{bban}"
    return " ".join(code[i : i + 4] for i in range(0, len(code), 4)) if rng.random() < 0.5 else code


def phone(rng: random.Random) -> str:
    area = rng.choice(["212", "415", "617", "312", "206", "303"])
    exch = str(rng.randint(200, 999))
    line = f"{rng.randint(0, 9999):04d}"
    return rng.choice(
        [
            f"({area}) {exch}-{line}",
            f"{area}-{exch}-{line}",
            f"+1 {area} {exch} {line}",
            f"+44 20 7946 0{line[:3]}",
            f"+49 30 {rng.randint(1000000, 9999999)}",
        ]
    )


def email(rng: random.Random) -> str:
    user = rng.choice(["anna.schmidt", "j.doe", "m_lee42", "support+billing", "ravi"])
    return f"{user}@{rng.choice(['example.org', 'mail.co.uk', 'uni-bonn.de', 'corp.io'])}"


def ip(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return rng.choice(["2001:4860:4860::8888", "2606:4700:4700::1111", "2a00:1450:4001:82b::200e"])
    while True:  # a public address: private and loopback ones are not personal (public_ips_only)
        value = ".".join(str(rng.randint(1, 223 if i == 0 else 254)) for i in range(4))
        if ipaddress.ip_address(value).is_global:
            return value


def secret(rng: random.Random) -> str:
    alnum = string.ascii_letters + string.digits
    pick = rng.randrange(6)
    if pick == 0:
        return "AKIA" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16))
    if pick == 1:
        return "ghp_" + "".join(rng.choice(alnum) for _ in range(36))
    if pick == 2:
        return "sk-proj-" + "".join(rng.choice(alnum) for _ in range(40))
    if pick == 3:
        return "hf_" + "".join(rng.choice(alnum) for _ in range(34))
    if pick == 4:
        return "xoxb-" + "-".join("".join(rng.choice(string.digits) for _ in range(12)) for _ in range(2))
    return "AIza" + "".join(rng.choice(alnum + "_-") for _ in range(35))


MAKERS = {"email": email, "phone": phone, "ip": ip, "credit_card": card, "iban": iban, "secret": secret}


def decoy(rng: random.Random) -> str:
    return rng.choice(
        [
            f"{rng.randint(2000, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            f"version {rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}",
            f"order {rng.randint(10**11, 10**12 - 1)}",
            f"ISBN 978-{rng.randint(0, 9)}-{rng.randint(100, 999)}-{rng.randint(10000, 99999)}-{rng.randint(0, 9)}",
            bad_card(rng),
            f"{rng.randint(1, 999):,} {rng.randint(100, 999)} people",
            f"commit {''.join(rng.choice('0123456789abcdef') for _ in range(40))}",
            f"pi is {rng.random() * 10:.6f}",
            f"room {rng.randint(100, 999)}, floor {rng.randint(1, 30)}",
            f"the years {rng.randint(1900, 1990)}-{rng.randint(1991, 2024)}",
        ]
    )


def planted_texts(n: int, seed: int = 0) -> list[tuple[str, dict[str, list[str]]]]:
    """n texts, each with 0-3 planted PII values among decoys: (text, {type: [values]})."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts, planted = [], {}
        for _ in range(rng.randint(2, 5)):
            parts += rng.sample(FILLER, rng.randint(5, 12))
            parts.append(decoy(rng) if rng.random() < 0.5 else rng.choice(FILLER))
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            kind = rng.choice(list(MAKERS))
            value = MAKERS[kind](rng)
            planted.setdefault(kind, []).append(value)
            parts.insert(rng.randint(0, len(parts)), f"{rng.choice(['contact', 'use', 'see', 'is'])} {value} ,")
        out.append((" ".join(parts), planted))
    return out
