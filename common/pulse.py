"""A wake-up for "something changed, look again", fired as often as things change."""

from __future__ import annotations

import trio


class Pulse:
    """Wakes every task waiting at the moment it fires, then re-arms: whoever waits after a fire waits for the next.

    Why not a bare `trio.Event`: an event is one-shot, so a waiter of the next change would find the old one set and
    spin; replacing it after each set by hand is the idiom this type names once. A fire with no waiter is not kept
    and costs nothing (engines fire one after every step), so a waiter re-checks its condition before it waits, and
    again after each wake: `while not condition(): await pulse.wait()`.

    Nothing is lost between the check and the wait: `wait` takes the current event before its first checkpoint, so
    with no `await` between check and wait no other task runs in between (trio switches tasks only at checkpoints)."""

    def __init__(self) -> None:
        self._event: trio.Event | None = None  # made by the first waiter since the last fire

    def fire(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self) -> None:
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()
