"""The streams of one request's choices (`n`) read as one: each item with its choice's index, in arrival order.

One reader, no tasks: the streams' queues wake one parking lot (`watch`), and the reader takes whichever stream has
an item ready. A choice's stream may hold the reader while it retries after a failure; the others' items wait in
their queues meanwhile, and come next."""

from __future__ import annotations

from collections.abc import Sequence

import trio

from sagellm.gateway.serving.item_stream import Item, ItemStream
from sagellm.runtime.pipeline.messages import is_terminal


class ChoiceStreams:
    def __init__(self, streams: Sequence[ItemStream]) -> None:
        self.streams = streams
        self._open = list(range(len(streams)))  # the choices not ended yet
        self._arrived = trio.lowlevel.ParkingLot()
        if len(streams) > 1:
            for stream in streams:
                stream.watch(self._arrived)

    def __aiter__(self) -> ChoiceStreams:
        return self

    async def __anext__(self) -> tuple[int, Item]:
        if len(self.streams) == 1:  # one choice: its own stream, nothing to wait on besides
            return 0, await anext(self.streams[0])
        while self._open:
            for index in self._open:
                if self.streams[index].has_ready():
                    try:
                        item = await anext(self.streams[index])
                    except StopAsyncIteration:
                        self._open.remove(index)
                        break
                    if is_terminal(item):
                        self._open.remove(index)
                    return index, item
            else:
                await self._arrived.park()
        raise StopAsyncIteration

    def has_ready(self) -> bool:
        """An item of some choice is already here: the next iteration will not wait."""
        return any(self.streams[index].has_ready() for index in self._open)

    def cancel(self) -> None:
        """The client left: every choice is aborted wherever it is."""
        for stream in self.streams:
            stream.cancel()
