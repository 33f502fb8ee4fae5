"""A request's items as the routes read them, wherever they come from: the one stream type of the routes.

In the gateway's process a request's items come from the graph (`request_stream.RequestStream`, which also retries
and resumes); in an API server's they come over the link from the core (`api_servers.remote_core.RemoteStream`,
which only carries them). Both are an `ItemStream`: the routes iterate it, ask whether an item is already here, let a
reader of several streams wait on one parking lot, and cancel it when the client leaves."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque

import trio

from sagellm.runtime.pipeline.messages import Embedding, RequestError, TokenDelta, is_terminal

Item = TokenDelta | Embedding | RequestError


class ItemQueue:
    """A request's items in arrival order: `put` never waits (unbounded: an engine never waits on a slow client),
    `get` waits for the next; true while an item is waiting. A deque and a parking lot: cheaper per token than a
    memory channel."""

    def __init__(self) -> None:
        self._items: deque[Item] = deque()
        self._arrived = trio.lowlevel.ParkingLot()
        self.watchers: list[trio.lowlevel.ParkingLot] = []  # unparked too: a reader of several queues waits there

    def __bool__(self) -> bool:
        return bool(self._items)

    def put(self, item: Item) -> None:
        self._items.append(item)
        if self._arrived:
            self._arrived.unpark()
        for watcher in self.watchers:
            watcher.unpark_all()

    async def get(self) -> Item:
        while not self._items:
            await self._arrived.park()
        return self._items.popleft()


class ItemStream(ABC):
    """The items of one request (TokenDeltas, then one terminal TokenDelta, Embedding or RequestError) in arrival
    order. Iterating it again goes on where the last iteration stopped; it ends after the terminal item."""

    def __init__(self) -> None:
        self.done = False
        self._items = ItemQueue()

    def __aiter__(self) -> ItemStream:
        return self

    async def __anext__(self) -> Item:
        """The next item (a method, not an async generator: a reader that stops early, as one that waits for the
        first item does, leaves no generator behind for the event loop to finalize)."""
        if self.done and not self._items:
            raise StopAsyncIteration
        item = await self._items.get()
        if is_terminal(item):
            self.done = True
        return item

    def has_ready(self) -> bool:
        """An item is already here: the next iteration will not wait (a writer sends what is ready in one go)."""
        return bool(self._items)

    def watch(self, lot: trio.lowlevel.ParkingLot) -> None:
        """Unparks `lot` too whenever an item arrives (`ChoiceStreams` reads several streams)."""
        self._items.watchers.append(lot)

    def deliver(self, item: Item) -> None:
        self._items.put(item)

    @abstractmethod
    def cancel(self) -> None:
        """The client left: the request is aborted wherever it is (a no-op once it ended)."""
