"""run.plan=true through the real CLI against the real CPU engine (behind the fault server, a
test double used here only to count what reaches the engine): the estimate, and a pilot that
the real run replays instead of paying for twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import forge_cli, read_rows, read_stats, write_jsonl
from fault_server import FaultServer, endpoint_run_args

pytestmark = pytest.mark.slow


def test_plan_sends_only_the_pilot_and_the_run_replays_it(tmp_path: Path, cpu_server: dict) -> None:
    n, pilot = 40, 8
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"p{i}", "prompt": f"plan prompt number {i}"} for i in range(n)])
    out = tmp_path / "out"
    with FaultServer(cpu_server["url"]) as fs:
        args = [
            *endpoint_run_args(fs, cpu_server["model"], "FORGE_TEST_KEY", data, out),
            "model.price_in_per_mtok=1000",
            "model.price_out_per_mtok=4000",
            "run.max_in_flight=4",
        ]
        planned = forge_cli([*args, "run.plan=true", f"run.plan_pilot={pilot}"], tmp_path, env={"FORGE_TEST_KEY": "k"})
        assert planned.returncode == 0, planned.stderr[-2000:]
        assert fs.total == pilot and not read_rows(out)
        estimate = json.loads((out / "plan.json").read_text())
        assert (estimate["rows"], estimate["requests"], estimate["pilot_answers"]) == (n, n, pilot)
        assert f"rows: {n} ({n} to go), {n} requests" in planned.stdout
        assert "cost: $" in planned.stdout and estimate["worst_cost_usd"] >= estimate["cost_usd"] > 0

        ran = forge_cli(args, tmp_path, env={"FORGE_TEST_KEY": "k"})
        assert ran.returncode == 0, ran.stderr[-2000:]
        assert fs.total == n  # the pilot's answers were replayed, not sent again
        session = read_stats(out)["sessions"][-1]
        assert session["cache_hits"] == pilot and session["requests_sent"] == n - pilot
        rows = read_rows(out)
        actual_prompt = sum(r["prompt_tokens"] for r in rows)
        actual_out = sum(r["completion_tokens"] for r in rows)
        # the estimate measured prompts with the model's tokenizer and timed a pilot of real answers
        assert abs(estimate["prompt_tokens"] - actual_prompt) <= 0.15 * actual_prompt
        assert abs(estimate["completion_tokens"] - actual_out) <= 0.25 * actual_out
        stats = read_stats(out)
        assert [s["status"] for s in stats["sessions"]] == ["plan", "complete"]
        spent = stats["spent_usd"]  # the pilot's spend counts too
        assert spent == pytest.approx(sum(r["cost_usd"] for r in rows), rel=1e-6)
        assert abs(estimate["cost_usd"] - spent) <= 0.25 * spent
