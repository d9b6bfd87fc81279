"""stats.json's session record: throughput is timed from the first request sent."""

from __future__ import annotations

from forge.stages.generate.generator import SessionStats
from forge.stages.generate.stats import session_record


def test_generation_is_timed_from_the_first_request_not_engine_ready() -> None:
    s = SessionStats(completion_tokens=1000, first_send=173.0, last_answer=183.0)
    # engine ready at 100 s, tokenizer loading and retries until 173 s: not generation
    record = session_record(s, startup_s=40.0, ready_at=100.0, restarts=0, gpus=1, status="complete")
    assert record["generation_s"] == 10.0 and record["first_request_after_ready_s"] == 73.0
    assert record["output_tokens_per_s"] == 100.0 and record["output_tokens_per_s_per_gpu"] == 100.0


def test_a_session_that_sent_nothing_measures_nothing() -> None:
    record = session_record(SessionStats(cache_hits=5), None, None, 0, 0, "complete")
    assert record["generation_s"] is None and record["output_tokens_per_s"] is None
