"""Costs and run.budget_usd through the real CLI: the fault server (a test double, here only to
count what reaches the engine) proxies to the real CPU engine, whose usage counts price each row."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import forge_cli, read_rows, read_stats, write_jsonl
from fault_server import FaultServer, endpoint_run_args

pytestmark = pytest.mark.slow

IN, OUT = 2_000.0, 8_000.0  # US$ per million tokens: high, so that tiny answers add up
N = 24


def _args(fs: FaultServer, model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        *endpoint_run_args(fs, model, "FORGE_TEST_KEY", data, out),
        f"model.price_in_per_mtok={IN}",
        f"model.price_out_per_mtok={OUT}",
        "run.max_in_flight=4",
        *extra,
    ]


def test_row_costs_and_a_budget_that_runs_out_mid_run(tmp_path: Path, cpu_server: dict) -> None:
    rows = [{"id": f"b{i}", "prompt": f"budget prompt number {i}"} for i in range(N)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    model = cpu_server["model"]
    env = {"FORGE_TEST_KEY": "sk-test"}
    with FaultServer(cpu_server["url"]) as fs:
        full = tmp_path / "full"
        done = forge_cli(_args(fs, model, data, full), tmp_path, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        priced = read_rows(full)
        for r in priced:  # each row's cost is its own token counts at the prices
            assert r["cost_usd"] == pytest.approx((r["prompt_tokens"] * IN + r["completion_tokens"] * OUT) / 1e6)
        total = sum(r["cost_usd"] for r in priced)
        stats = read_stats(full)
        assert stats["spent_usd"] == pytest.approx(total, rel=1e-6) and stats["rows_cost_usd"] == pytest.approx(total)
        assert "| cost (US$) |" in (full / "README.md").read_text()

        capped = tmp_path / "capped"
        budget = round(total / 2, 6)
        before = fs.total
        stopped = forge_cli(_args(fs, model, data, capped, f"run.budget_usd={budget}"), tmp_path, env=env)
        assert stopped.returncode == 1
        errors = [x for x in stopped.stderr.splitlines() if x.startswith("forge: error:")]
        assert len(errors) == 1, stopped.stderr
        line = errors[0]
        assert line.startswith(f"forge: error: run.budget_usd={budget:g} reached: $"), stopped.stderr
        kept = read_rows(capped)
        spent = read_stats(capped)["spent_usd"]
        assert 0 < len(kept) < N and spent <= budget
        assert spent == pytest.approx(sum(r["cost_usd"] for r in kept), rel=1e-6)  # no paid answer thrown away
        sent = fs.total - before
        assert sent == len(kept)

        again = forge_cli(_args(fs, model, data, capped, f"run.budget_usd={budget}"), tmp_path, env=env)
        assert again.returncode == 1 and fs.total - before == sent  # the same cap: nothing more is sent

        raised = forge_cli(_args(fs, model, data, capped, f"run.budget_usd={total * 2}"), tmp_path, env=env)
        assert raised.returncode == 0, raised.stderr[-2000:]
        ids = Counter(r["id"] for r in read_rows(capped))
        assert len(ids) == N and max(ids.values()) == 1
        assert fs.total - before == N  # every row's request reached the engine once over the three runs
        assert read_stats(capped)["spent_usd"] == pytest.approx(total, rel=0.05)
