"""The pii filter: every type found and redacted (or quarantined) in documents and chat turns,
decoys left alone, counts in stats and card, measured on the planted set."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import forge_cli, read_rows, read_stats, write_jsonl

from forge.schema import ConfigError
from forge.stages.curate.filters import build_filters
from forge.stages.curate.pii import PiiFinder, iban_ok, luhn_ok
from forge.stages.curate.planted_pii import planted_texts


def test_validators() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89 3704 0044 0532 0130 00") and iban_ok("GB82WEST12345698765432")
    assert not iban_ok("DE89370400440532013001")  # check digits fail
    assert not iban_ok("DE8937040044053201300")  # Germany's IBANs have 22 characters


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("write to anna.schmidt@uni-bonn.de today", "email"),
        ("call (415) 555-2671 now", "phone"),
        ("call +44 20 7946 0958 now", "phone"),
        ("host 8.8.8.8 is up", "ip"),
        ("host 2001:4860:4860::8888 is up", "ip"),
        ("the dev 8.8.8.8 box", "ip"),
        ("docs use 192.0.2.1 2001 times", "ip"),
        ("office 415.555.0132 ext", "phone"),
        ("pay DE89 3704 0044 0532 0130 00 OK?", "iban"),
        ("card 4111 1111 1111 1111 expires", "credit_card"),
        ("amex 3782 822463 10005 ok", "credit_card"),
        ("pay to GB82 WEST 1234 5698 7654 32 please", "iban"),
        ("export AWS_KEY=AKIAIOSFODNN7EXAMPLE", "secret"),
        ('config: api_key = "q8Zr2LmX9vTa0Kd7WnYp"', "secret"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "secret"),
    ],
)
def test_each_type_is_found(text: str, kind: str) -> None:
    assert [t for _, _, t in PiiFinder().spans(text)] == [kind]


@pytest.mark.parametrize(
    "text",
    [
        "released on 2024-01-15 as version 3.12.1",
        "order 843415134880 shipped",
        "card 4111 1111 1111 1112 is invalid",  # Luhn fails
        "ISBN 978-3-161-48410-0",
        "commit 9fceb02d0ae598e95dc970b74767f19372d61af8",
        "the password field is required",
        "between 1990-2020 about 3.5 million people",
        "ISBN-10 0-306-40615-2",
        "New York is at 40.7128 -74.0060",
        "population 8 336 817, budget 1 234 567 890",
        "logged at 20240115 1200 and 2024 0115 1230",
        "serve on 127.0.0.1 or 0.0.0.0 in the tutorial",
        "the build finished at ts 1712345678 today",
        "upgrade to version 1.2.3.4",
        "call Abc::Def or a::b in Perl",
        "the image logo@2x.png",
        "password: /usr/local/bin/python3.11",
        'api_key="your-api-key-here-12345"',
    ],
)
def test_decoys_are_left_alone(text: str) -> None:
    assert PiiFinder().spans(text) == []


def test_tool_calls_and_rejected_raw_rows_are_redacted_as_decoded_json() -> None:
    """JSON text hides a value after a newline from the detectors (`\\n` ends in a letter):
    tool calls and raw records are redacted decoded, and stay valid JSON."""
    import json

    f = build_filters([{"name": "pii"}], None)[0]
    call = json.dumps([{"name": "send", "arguments": {"body": "hi\njohn.doe@gmail.com\n4111 1111 1111 1111"}}])
    row = {"messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": "", "tool_calls": call}]}
    f.check(row)
    body = json.loads(row["messages"][1]["tool_calls"])[0]["arguments"]["body"]
    assert body == "hi\n[EMAIL]\n[CREDIT_CARD]"
    record = f.redact_value({"text": "a\n8.8.8.8\tb", "n": 3})
    assert record == {"text": "a\n[IP]\tb", "n": 3}


def test_precision_and_recall_on_the_planted_set() -> None:
    """Every planted value found with its type; decoys (dates, versions, Luhn-failing numbers,
    hashes, ISBNs) not taken: recall and precision >= 0.99 on 2,000 texts."""
    finder = PiiFinder()
    tp = fn = fp = 0
    missed: Counter[str] = Counter()
    for text, planted in planted_texts(2000, seed=3):
        found = Counter((text[a:b], t) for a, b, t in finder.spans(text))
        want = Counter((v, t) for t, vs in planted.items() for v in vs)
        tp += sum((found & want).values())
        fn += sum((want - found).values())
        fp += sum((found - want).values())
        missed.update(t for _, t in (want - found))
    recall, precision = tp / (tp + fn), tp / (tp + fp)
    assert recall >= 0.99 and precision >= 0.99, (recall, precision, missed)


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"curate.filters\[0\] \(pii\): action"):
        build_filters([{"name": "pii", "action": "erase"}], None)
    with pytest.raises(ConfigError, match="unknown.*'passport'"):
        build_filters([{"name": "pii", "types": ["email", "passport"]}], None)


@pytest.mark.slow
def test_redact_and_quarantine_through_the_cli(tmp_path: Path) -> None:
    """Documents and chat turns: redact keeps every row with typed placeholders and counts the
    finds per type in stats.json and the card; quarantine moves the rows with PII to rejected/
    with the types (never the values); kept + rejected = input either way."""
    rows = [
        {"text": "Reach the desk at help@corp.io or 212-555-0143 during office hours, Monday to Friday."},
        {"text": "tiny: write to secret.person@corp.io"},  # removed by the length filter: redacted in rejected/ too
        {"text": "Nothing personal in this one: the meeting moved to 2025-03-04 in room 301 as agreed."},
        {
            "messages": [
                {"role": "user", "content": "my card is 4111-1111-1111-1111, can you check it?"},
                {
                    "role": "assistant",
                    "content": "Please never share it; your key hf_abcdefghijklmnopqrstuvwxyz0123456789 too.",
                },
            ]
        },
    ]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "clean"
    args = [
        "pipeline=curate",
        f"dataset.name={data}",
        f"output.dir={out}",
        "curate.filters=[{name: pii, action: redact}, {name: length, min_chars: 40}]",
    ]
    proc = forge_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept, rejected = read_rows(out), read_rows(out, "rejected")
    assert len(kept) == 3 and len(rejected) == 1 and rejected[0]["filter"] == "length"
    assert "secret.person@corp.io" not in rejected[0]["row"] and "[EMAIL]" in rejected[0]["row"]
    texts = " ".join(r["text"] or " ".join(m["content"] for m in r["messages"]) for r in kept)
    assert "[EMAIL]" in texts and "[PHONE]" in texts and "[CREDIT_CARD]" in texts and "[SECRET]" in texts
    for value in ("help@corp.io", "212-555-0143", "4111-1111-1111-1111", "hf_abcdefghij"):
        assert value not in texts
    assert "2025-03-04" in texts and "room 301" in texts
    found = read_stats(out)["filters"]["pii"]
    assert found == {"rows_with_pii": 3, "found": {"email": 2, "phone": 1, "credit_card": 1, "secret": 1}}
    assert "`pii` | found.credit_card | 1" in (out / "README.md").read_text()

    out2 = tmp_path / "quarantined"
    args = [
        "pipeline=curate",
        f"dataset.name={data}",
        f"output.dir={out2}",
        "curate.filters=[{name: pii, action: quarantine}]",
    ]
    proc = forge_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept, rejected = read_rows(out2), read_rows(out2, "rejected")
    assert len(kept) == 1 and len(rejected) == 3
    assert {r["reason"] for r in rejected} == {"contains_pii"}
    assert sorted(r["value"] for r in rejected) == [
        '{"credit_card":1,"secret":1}',
        '{"email":1,"phone":1}',
        '{"email":1}',
    ]


@pytest.mark.slow
def test_kill_9_then_rerun_counts_every_find_once(tmp_path: Path) -> None:
    """pii and decontaminate over 3,000 rows in chunks of 40, killed twice mid-run: the re-run gives
    the uninterrupted run's rows, rejected rows and per-type counts (no batch counted twice)."""
    from conftest import kill_forge_at_random

    from forge.stages.curate.decontaminate import known_sets

    tiny = [json.loads(line)["question"] for line in Path(known_sets()["tiny"]["path"]).read_text().splitlines()]
    rows = [
        {"text": f"{i}: {text} " + (tiny[i % len(tiny)] if i % 9 == 0 else "")}
        for i, (text, _) in enumerate(planted_texts(3000, seed=11))
    ]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    extra = [
        "curate.filters=[{name: decontaminate, benchmarks: [tiny]}, {name: pii, action: redact}]",
        "output.examples_per_chunk=40",
        "run.progress=false",
        "curate.dedup_exact=false",
    ]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    args = ["pipeline=curate", f"dataset.name={data}", *extra]
    assert forge_cli([*args, f"output.dir={ref}"], tmp_path).returncode == 0
    watch = out / "data"
    kill_forge_at_random([*args, f"output.dir={out}"], tmp_path, lambda: watch.exists() and any(watch.iterdir()), 0.5)
    proc = forge_cli([*args, f"output.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for sub in ("data", "rejected"):
        assert sorted(r["id"] for r in read_rows(out, sub)) == sorted(r["id"] for r in read_rows(ref, sub))
    assert len(read_rows(out)) + len(read_rows(out, "rejected")) == 3000
    assert read_stats(out)["filters"] == read_stats(ref)["filters"]
    assert read_stats(ref)["filters"]["decontaminate"]["contaminated_rows"]["tiny"] == 334
