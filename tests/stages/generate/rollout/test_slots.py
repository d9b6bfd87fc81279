"""Engine slots by priority (rollout.later_steps_first): order, ties, and cancellation."""

from __future__ import annotations

import asyncio

import pytest

from forge.stages.generate.rollout.slots import Slots


async def order_served(priorities: list[int]) -> list[int]:
    """Which waiters (by index) get the one slot, in turn, when each releases it at once."""
    slots = Slots(1)
    await slots.acquire()  # held while everyone queues
    served: list[int] = []

    async def waiter(i: int, priority: int) -> None:
        await slots.acquire(priority)
        served.append(i)
        slots.release()

    tasks = [asyncio.create_task(waiter(i, p)) for i, p in enumerate(priorities)]
    await asyncio.sleep(0)
    assert slots.waiting() == len(priorities)
    slots.release()
    await asyncio.gather(*tasks)
    assert slots.free == 1 and slots.waiting() == 0
    return served


def test_lower_priority_first_ties_in_arrival_order() -> None:
    assert asyncio.run(order_served([0, 0, -1, -3, 0, -1])) == [3, 2, 5, 0, 1, 4]
    assert asyncio.run(order_served([0, 0, 0])) == [0, 1, 2]


def test_free_slots_are_taken_at_once_up_to_n() -> None:
    async def main() -> None:
        slots = Slots(2)
        await slots.acquire(5)
        await slots.acquire(-5)
        third = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0.01)
        assert not third.done() and slots.waiting() == 1
        slots.release()
        await asyncio.wait_for(third, 1)
        assert slots.free == 0

    asyncio.run(main())


async def held_with_two_waiters() -> tuple[Slots, asyncio.Task, asyncio.Task]:
    """One slot, held; `first` (priority -1) and `second` (0) waiting for it."""
    slots = Slots(1)
    await slots.acquire()
    first = asyncio.create_task(slots.acquire(-1))
    second = asyncio.create_task(slots.acquire(0))
    await asyncio.sleep(0)
    return slots, first, second


async def cancelled(task: asyncio.Task) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_cancelled_waiter_takes_no_slot() -> None:
    async def main() -> None:
        slots, first, second = await held_with_two_waiters()
        await cancelled(first)
        assert slots.waiting() == 1
        slots.release()
        await asyncio.wait_for(second, 1)  # the cancelled one, though first, did not swallow the slot
        slots.release()
        assert slots.free == 1 and slots.waiting() == 0
        await asyncio.wait_for(slots.acquire(), 1)  # free again: taken at once

    asyncio.run(main())


def test_a_waiter_cancelled_as_it_is_handed_the_slot_passes_it_on() -> None:
    async def main() -> None:
        slots, first, second = await held_with_two_waiters()
        slots.release()
        await asyncio.sleep(0)  # the slot is handed to `first` (next loop turn), which has not run yet ...
        assert slots.free == 0 and slots.waiting() == 1 and not first.done()
        await cancelled(first)  # ... and is cancelled before it does
        await asyncio.wait_for(second, 1)
        assert slots.free == 0 and slots.waiting() == 0

    asyncio.run(main())
