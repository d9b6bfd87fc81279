"""Engine slots for rollouts, handed out by priority instead of arrival.

With a plain semaphore every waiting draft is served before the critique of a draft that has just
finished, so each step runs as a wave over all active samples (as a wave script does) and a
sample's earlier turns have left the engine's prefix cache by the time its next step is sent.
Serving later steps first finishes samples sooner (rows reach disk sooner, fewer half-done samples
at a kill) and sends each step while the previous one's KV blocks are still cached.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools


class Slots:
    """At most `n` holders at once; a waiter with a lower `priority` goes first, ties in arrival
    order. A cancelled waiter leaves no trace: its slot, if it was just handed one, goes on."""

    def __init__(self, n: int) -> None:
        self.free = n
        self._waiting: list[tuple[int, int, asyncio.Future]] = []  # cancelled ones are skipped later
        self._live = 0  # waiters not cancelled
        self._handing_out = False
        self._arrival = itertools.count()

    def waiting(self) -> int:
        return self._live

    async def acquire(self, priority: int = 0) -> None:
        if self.free > 0 and not self._live:
            self.free -= 1
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._arrival), fut))
        self._live += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.cancelled():  # gave up while waiting
                self._live -= 1
            else:  # handed a slot just as it was cancelled: pass the slot on
                self.release()
            raise

    def release(self) -> None:
        """The slot is handed out on the loop's next turn, not now: the sample that released it
        usually asks for its next step in the same turn, and must be among those considered."""
        self.free += 1
        if self._live and not self._handing_out:
            self._handing_out = True
            asyncio.get_running_loop().call_soon(self._hand_out)

    def _hand_out(self) -> None:
        self._handing_out = False
        while self.free > 0 and self._waiting:
            _, _, fut = heapq.heappop(self._waiting)
            if fut.done():  # cancelled while waiting
                continue
            self.free -= 1
            self._live -= 1
            fut.set_result(None)
