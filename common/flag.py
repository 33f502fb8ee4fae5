"""A wake-up kept until its one consumer takes it: "there is something for you", said by producers at any moment."""

from __future__ import annotations

import trio


class Flag:
    """Set by any number of producers, taken by one consumer: `take` waits until the flag is set, then lowers it.

    A set is kept until it is taken, so a producer that sets it while its consumer is busy elsewhere (sending what
    was queued before, restarting what was lost) is heard at the consumer's next `take`; sets between two takes are
    one. What was produced lives beside the flag (an outbox, a cause): the flag says only that there is some.

    Why not a bare `trio.Event`: an event cannot be lowered, so each consumer replaced it after waiting by hand; this
    type names that idiom once. Its counterpart `common.pulse.Pulse` keeps nothing: a fire wakes only whoever waits
    at that moment (a change to look at again, not an item to take)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def take(self) -> None:
        """Returns once the flag is set (at once when it is already), having lowered it."""
        await self._event.wait()
        self._event = trio.Event()
