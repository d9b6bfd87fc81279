"""forge/engine/inprocess.py on the CPU: EngineLoad (where a rollout's time went: how full the
engine was kept, how busy forge's event-loop thread was) and when a request priority is sent."""

from __future__ import annotations

import time

from forge.engine.config import ModelConfig
from forge.engine.inprocess import EngineLoad, priority_scheduling


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_mean_requests_time_below_a_full_batch_and_loop_cpu() -> None:
    load = EngineLoad(full_batch=2)
    load.change(+1)
    time.sleep(0.2)  # one request inside, the thread idle
    load.change(+1)
    spin(0.2)  # a full batch, the thread busy
    load.change(-1)
    load.change(-1)
    notes = load.notes()
    assert 0.35 <= notes["engine_window_s"] <= 0.6
    assert 1.2 <= notes["engine_requests_mean"] <= 1.8  # ~half the window at 1, half at 2
    assert 0.15 <= notes["engine_below_full_batch_s"] <= 0.35
    assert 0.05 <= notes["loop_cpu_s"] <= 0.3  # the spin, not the sleep
    assert abs(notes["loop_busy"] - notes["loop_cpu_s"] / notes["engine_window_s"]) < 0.05


def test_no_requests_no_figures() -> None:
    notes = EngineLoad(full_batch=4).notes()
    assert notes["engine_requests_mean"] is None and notes["loop_busy"] is None and notes["loop_cpu_s"] == 0.0


def test_priority_is_sent_only_to_an_engine_that_schedules_by_it() -> None:
    """vLLM refuses a request priority unless the engine was started with scheduling_policy=priority."""
    assert not priority_scheduling(ModelConfig())
    assert not priority_scheduling(ModelConfig(engine_args={"scheduling_policy": "fcfs"}))
    assert priority_scheduling(ModelConfig(engine_args={"scheduling_policy": "priority"}))
    assert priority_scheduling(ModelConfig(engine_args={"scheduling-policy": "priority"}))
