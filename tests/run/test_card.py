"""The dataset card of a real finished run on the CPU engine: what it says matches the shards and
stats, a resumed run does not count twice, and no secret reaches it."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from conftest import endpoint_args, forge_cli, read_rows, read_stats, write_jsonl

FAKE_TOKEN = "hf_FakeTokenForTheCardTest0123456789"


def _section(card: str, title: str) -> str:
    return card.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_card_describes_the_run_and_survives_a_resume(tmp_path: Path, cpu_server: dict) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"d{i}", "text": f"fact number {i}"} for i in range(12)])
    out = tmp_path / "out"
    args = [
        *endpoint_args(cpu_server),
        f"dataset.name={data}",
        "dataset.prompt_column=text",
        "dataset.id_column=id",
        "prompt=summarize",
        f"prompt.system=Be brief. {FAKE_TOKEN}",
        "generation.max_tokens=12",
        "generation.temperature=0.5",
        f"output.dir={out}",
        "output.examples_per_chunk=5",
    ]
    env = {"HF_TOKEN": FAKE_TOKEN}
    first = forge_cli(args, tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["configs"][0]["data_files"][0]["path"] == "data/*.parquet"
    assert header["size_categories"] == ["n<1K"]
    rows = read_rows(out)
    tokens_out = sum(r["completion_tokens"] for r in rows)
    stats_part = _section(card, "Statistics")
    assert "| documents in | 12 |" in stats_part and "| documents written | 12 (12 rows) |" in stats_part
    assert f"/ {tokens_out:,} |" in stats_part
    assert "Summarize the following document" in card and "temperature=0.5" in card
    assert f"dataset.name={data}" in _section(card, "How it was made")  # the reproducing command
    assert "endpoint" in card and str(out / "data") in card  # engine and how to load it
    assert len(re.findall(r"^\*\*d\d+\*\*", card, re.M)) == 3  # sample rows
    assert FAKE_TOKEN not in card and FAKE_TOKEN not in (out / "config.yaml").read_text()
    # re-run: everything is done, nothing is sent, and the card counts the same rows once
    again = forge_cli(args, tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert read_stats(out)["sessions"][-1]["requests_sent"] == 0
    assert _section((out / "README.md").read_text(), "Statistics") == stats_part
    assert sum(pq.read_metadata(f).num_rows for f in (out / "data").glob("*.parquet")) == 12
