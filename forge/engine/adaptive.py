"""Adaptive concurrency for hosted endpoints (`model.engine=endpoint`, `run.adaptive_concurrency`).

A provider's rate limit is not known in advance and changes with the account, the hour and
other users. A fixed `run.max_in_flight` is either too low (slow) or too high (a storm of 429s,
each retried after a back-off). forge instead runs AIMD, as TCP does: start moderate, grow while
answers are healthy (doubling per round trip until the first sign of congestion, then one more
request per round trip), and on a 429/503/timeout cut the limit to 70% — once per round trip,
not once per failed request of the same burst. `Retry-After` pauses every new send, not just the
retried one, and the OpenAI/Anthropic rate-limit headers (requests/tokens remaining, reset time)
pause sending before the limit is hit.

A request-rate limit is not a concurrency limit: a fast server answers 2 requests in flight at
20 requests/s, over a limit of 8/s. So a 429 also paces sends: the next ones go out at 85% of
the rate answers were coming back at, and the pace then grows 1% per answer until the next 429
(AIMD on the rate: ~92% of the limit on average, a 429 every ~16 answers). A provider's stated
requests-per-minute (`x-ratelimit-limit-requests`, `anthropic-ratelimit-requests-limit`) caps
the pace from the first answer.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

DECREASE = 0.7  # the cut on congestion (TCP CUBIC's beta): 0.5 would idle a rate-limited run too long
RATE_DECREASE = 0.85  # the pace after a 429, as a share of the rate answers were coming back at
RATE_GROWTH = 0.01  # the pace grows this much per answer between 429s
RATE_WINDOW_S = 2.0  # answers over the last seconds give the rate they come back at
DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def reset_seconds(value: str | None, now: float | None = None) -> float | None:
    """A rate-limit reset as seconds from now: OpenAI's durations (`1s`, `6m0s`, `20ms`), plain
    seconds, or Anthropic's RFC 3339 time. None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    parts = DURATION.findall(value)
    if parts and "".join(n + u for n, u in parts) == value:
        return sum(float(n) * UNITS[u] for n, u in parts)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(when.timestamp() - (now if now is not None else time.time()), 0.0)


def _remaining(headers: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = headers.get(name)
        if value is not None:
            try:
                return int(float(value))
            except ValueError:
                return None
    return None


class AdaptiveLimit:
    """How many requests may be in flight now, between `floor` and `ceiling` (run.max_in_flight)."""

    def __init__(self, start: int, ceiling: int, floor: int = 1) -> None:
        self.ceiling = max(ceiling, 1)
        self.floor = min(max(floor, 1), self.ceiling)
        self.limit = float(min(max(start, self.floor), self.ceiling))
        self.slow_start = True
        self.inside = 0
        self.sent = 0  # sequence number of the last request let through
        self.cut_after = 0  # a congestion signal from a request sent before this one is the same burst
        self.paused_until = 0.0  # monotonic: Retry-After or a rate-limit reset
        self.cuts = 0
        self.pauses = 0
        self.peak = self.limit
        self._waiters: deque[asyncio.Future] = deque()
        self.interval = 0.0  # seconds between sends; 0: not paced
        self.min_interval = 0.0  # from a stated requests-per-minute limit
        self.next_send = 0.0
        self.answered: deque[float] = deque(maxlen=256)  # monotonic times of recent healthy answers

    async def acquire(self) -> int:
        """Wait for a free slot and for any pause to end; returns the request's sequence number."""
        while True:
            wait = self.paused_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if self.inside < int(self.limit):
                self.inside += 1
                self.sent += 1
                seq = self.sent
                gap = max(self.interval, self.min_interval)
                if gap:
                    now = time.monotonic()
                    at = max(now, self.next_send)
                    self.next_send = at + gap
                    if at > now:
                        try:
                            await asyncio.sleep(at - now)
                        except asyncio.CancelledError:
                            self.release()
                            raise
                return seq
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, then cancelled: pass the free slot on
                raise

    def release(self) -> None:
        self.inside -= 1
        self._wake()

    def _wake(self) -> None:
        free = int(self.limit) - self.inside
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    def healthy(self) -> None:
        """An answer came back: grow (by one per answer in slow start, by one per round trip after)."""
        self.answered.append(time.monotonic())
        if self.interval:
            self.interval *= 1.0 - RATE_GROWTH
        self.limit = min(self.limit + (1.0 if self.slow_start else 1.0 / self.limit), float(self.ceiling))
        self.peak = max(self.peak, self.limit)
        self._wake()

    def congested(self, seq: int, retry_after_s: float | None = None, rate_limited: bool = False) -> None:
        """A 429/503/timeout of request `seq`: cut once per burst, pause for Retry-After; a 429
        (rate_limited) also slows the pace of sends."""
        if retry_after_s:
            self.pause(retry_after_s)
        if seq <= self.cut_after:
            return  # sent before the last cut: the same congestion, already answered
        if rate_limited:
            rate = self.answer_rate()
            if self.interval:
                rate = min(rate, 1.0 / self.interval) if rate else 1.0 / self.interval
            if rate:
                self.interval = 1.0 / (rate * RATE_DECREASE)
        self.limit = max(self.limit * DECREASE, float(self.floor))
        self.slow_start = False
        self.cut_after = self.sent
        self.cuts += 1

    def answered_within(self, seconds: float) -> bool:
        """Some request was answered in the last `seconds`: the server is serving, just throttling."""
        return bool(self.answered) and time.monotonic() - self.answered[-1] <= seconds

    def answer_rate(self) -> float | None:
        """Healthy answers per second over the last RATE_WINDOW_S (None: too few to tell)."""
        now = time.monotonic()
        recent = [t for t in self.answered if now - t <= RATE_WINDOW_S]
        if len(recent) < 3:
            return None
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-3)

    def pause(self, seconds: float) -> None:
        until = time.monotonic() + min(seconds, 300.0)
        if until > self.paused_until:
            self.paused_until = until
            self.pauses += 1

    def observe(self, headers: Mapping[str, str]) -> None:
        """Rate-limit headers of any answer (names lower-cased): a stated requests-per-minute
        caps the pace; when the requests or tokens left in the window reach zero, new sends wait
        for the window to reset."""
        rpm = _remaining(headers, "x-ratelimit-limit-requests", "anthropic-ratelimit-requests-limit")
        if rpm and rpm > 0:
            self.min_interval = 60.0 / rpm
        for kind in ("requests", "tokens"):
            left = _remaining(headers, f"x-ratelimit-remaining-{kind}", f"anthropic-ratelimit-{kind}-remaining")
            if left is not None and left <= 0:
                reset = headers.get(f"x-ratelimit-reset-{kind}") or headers.get(f"anthropic-ratelimit-{kind}-reset")
                seconds = reset_seconds(reset)
                if seconds:
                    self.pause(seconds)

    def notes(self) -> dict[str, Any]:
        return {
            "concurrency_final": round(self.limit, 1),
            "concurrency_peak": round(self.peak, 1),
            "concurrency_cuts": self.cuts,
            "rate_limit_pauses": self.pauses,
            "pace_req_s": round(1.0 / max(self.interval, self.min_interval), 2)
            if max(self.interval, self.min_interval)
            else None,
        }
