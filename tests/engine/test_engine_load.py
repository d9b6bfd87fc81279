"""EngineLoad (forge/engine/inprocess.py): the figures a rollout's stats use to say where the time
went — how full the engine was kept and how busy forge's event-loop thread was."""

from __future__ import annotations

import time

from forge.engine.inprocess import EngineLoad


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
