"""AIMD in-flight limit: growth, one cut per burst, pauses from Retry-After and rate-limit headers."""

import asyncio
import time
from datetime import datetime, timedelta, timezone

import pytest

from forge.engine.adaptive import DECREASE, AdaptiveLimit, reset_seconds
from forge.engine.client import retry_after_s


def test_slow_start_doubles_then_grows_by_one_per_round_trip() -> None:
    a = AdaptiveLimit(start=4, ceiling=100)
    for _ in range(4):  # one round trip at 4 in flight
        a.healthy()
    assert a.limit == 8
    seq = a.sent
    a.congested(seq + 1)
    assert a.limit == pytest.approx(8 * DECREASE) and not a.slow_start
    before = a.limit
    for _ in range(round(before)):  # one round trip now adds about one
        a.healthy()
    assert before + 0.8 < a.limit < before + 1.2


def test_a_burst_of_congestion_cuts_once_and_limits_hold() -> None:
    async def run() -> AdaptiveLimit:
        a = AdaptiveLimit(start=10, ceiling=10, floor=2)
        seqs = [await a.acquire() for _ in range(10)]
        for s in seqs:  # all ten answered 429: the same burst
            a.release()
            a.congested(s)
        assert a.cuts == 1 and a.limit == pytest.approx(7.0)
        for _ in range(20):  # later bursts: one cut each, never below the floor
            s = await a.acquire()
            a.release()
            a.congested(s)
        return a

    a = asyncio.run(run())
    assert a.limit == 2.0
    for _ in range(1000):
        a.healthy()
    assert a.limit == 10.0  # never above the ceiling (run.max_in_flight)


def test_no_more_in_flight_than_the_limit_and_waiters_wake() -> None:
    async def run() -> tuple[int, int]:
        a = AdaptiveLimit(start=3, ceiling=3)
        inside = peak = 0

        async def one() -> None:
            nonlocal inside, peak
            await a.acquire()
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.01)
            inside -= 1
            a.release()

        await asyncio.gather(*(one() for _ in range(30)))
        return peak, a.sent

    peak, sent = asyncio.run(run())
    assert peak == 3 and sent == 30


def test_retry_after_pauses_every_new_send() -> None:
    async def run() -> float:
        a = AdaptiveLimit(start=4, ceiling=4)
        s = await a.acquire()
        a.release()
        a.congested(s, retry_after_s=0.3)
        t0 = time.monotonic()
        await a.acquire()
        return time.monotonic() - t0

    assert asyncio.run(run()) >= 0.29


@pytest.mark.parametrize(
    ("headers", "pause"),
    [
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "250ms"}, 0.25),
        ({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1m0.5s"}, 60.5),
        ({"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "20s"}, 0.0),
        ({"anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-requests-reset": "IN_2_S"}, 2.0),
    ],
)
def test_rate_limit_headers_pause_before_the_limit_is_hit(headers: dict, pause: float) -> None:
    a = AdaptiveLimit(start=4, ceiling=4)
    in_2_s = (datetime.now(timezone.utc) + timedelta(seconds=2)).isoformat()  # Anthropic: an RFC 3339 time
    headers = {k: in_2_s if v == "IN_2_S" else v for k, v in headers.items()}
    t0 = time.monotonic()
    a.observe(headers)
    assert a.paused_until - t0 == pytest.approx(pause, abs=0.05) if pause else a.paused_until == 0.0


def test_reset_and_retry_after_formats() -> None:
    assert reset_seconds("6m0s") == 360.0 and reset_seconds("20ms") == pytest.approx(0.02)
    assert reset_seconds("1h2m3s") == 3723.0 and reset_seconds("2") == 2.0
    soon = (datetime.now(timezone.utc) + timedelta(seconds=30)).isoformat()
    assert 28 < reset_seconds(soon) <= 30
    assert reset_seconds("soon") is None and reset_seconds(None) is None
    assert retry_after_s({"retry-after-ms": "150", "retry-after": "1"}) == pytest.approx(0.15)
    assert retry_after_s({"retry-after": "3"}) == 3.0
    http_date = (datetime.now(timezone.utc) + timedelta(seconds=10)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 8 < retry_after_s({"retry-after": http_date}) <= 10
    assert retry_after_s({}) is None
