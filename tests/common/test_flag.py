"""`Flag`: a set is kept until its consumer takes it, sets between two takes are one, and a take lowers it."""

from __future__ import annotations

import trio
import trio.testing

from sagellm.common.flag import Flag


async def test_a_set_made_while_nobody_waits_is_kept_for_the_next_take(autojump_clock):
    flag = Flag()
    flag.set()
    with trio.fail_after(1):  # taken at once: the set was kept
        await flag.take()


async def test_sets_between_two_takes_are_one_and_a_take_lowers_the_flag(autojump_clock):
    flag = Flag()
    flag.set()
    flag.set()
    await flag.take()
    with trio.move_on_after(1) as waited:  # the second set was the first's: nothing is left to take
        await flag.take()
    assert waited.cancelled_caught


async def test_a_set_wakes_the_consumer_waiting_for_it():
    flag, taken = Flag(), []

    async def consumer() -> None:
        await flag.take()
        taken.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
        await trio.testing.wait_all_tasks_blocked()
        assert taken == []
        flag.set()
    assert taken == [True]
