"""`Pulse`: a fire wakes everyone waiting at that moment, and only them; whoever waits after it waits for the next."""

from __future__ import annotations

import trio
import trio.testing

from sagellm.common.pulse import Pulse


async def test_a_fire_wakes_every_task_waiting_at_that_moment():
    pulse, woken = Pulse(), []

    async def waiter(name: str) -> None:
        await pulse.wait()
        woken.append(name)

    async with trio.open_nursery() as nursery:
        for name in ("a", "b", "c"):
            nursery.start_soon(waiter, name)
        await trio.testing.wait_all_tasks_blocked()
        assert woken == []
        pulse.fire()
    assert sorted(woken) == ["a", "b", "c"]


async def test_a_waiter_that_starts_after_a_fire_waits_for_the_next_one():
    pulse, woken = Pulse(), []

    async def waiter() -> None:
        await pulse.wait()
        woken.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        pulse.fire()
        nursery.start_soon(waiter)  # starts after the fire: the one before must not wake it
        await trio.testing.wait_all_tasks_blocked()
        assert len(woken) == 1
        pulse.fire()
    assert len(woken) == 2


async def test_a_fire_with_no_waiter_is_harmless_and_not_kept(autojump_clock):
    pulse = Pulse()
    pulse.fire()
    pulse.fire()
    with trio.move_on_after(1) as waited:  # the fires before the wait do not count
        await pulse.wait()
    assert waited.cancelled_caught
