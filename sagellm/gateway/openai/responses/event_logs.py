"""The events of background responses, kept as they are made so a client can stream one (`background` with
`stream`) and, having lost the connection, stream it again from where it was (`GET /v1/responses/{id}?stream=true
&starting_after=N`), as OpenAI's API lets it. In memory, for the gateway's life: the latest MAX_LOGS responses'
(a stored response's body outlives a restart; its stream of deltas does not)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from typing import Any

import trio

from sagellm.gateway.http.app import LastEvents
from sagellm.gateway.http.errors import ApiError

MAX_LOGS = 256  # background responses whose events are kept, the oldest forgotten first


class EventLog:
    """One response's events in order (their `sequence_number` is their place), and whether it has ended."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.ended = False
        self._changed = trio.Event()

    def add(self, events: Iterable[dict[str, Any]]) -> None:
        self.events.extend(events)
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    async def follow(self, after: int) -> AsyncIterator[Any]:
        """The events after sequence number `after`, as they come, the last ones as `LastEvents` (the stream's end);
        a response that ended without a last event (cancelled) ends the stream bare."""
        shown = max(after + 1, 0)
        while True:
            changed = self._changed
            if shown < len(self.events):
                ready, shown = tuple(self.events[shown:]), len(self.events)
                yield LastEvents(ready) if self.ended and shown == len(self.events) else ready
                continue
            if self.ended:
                return
            await changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


class EventLogs:
    def __init__(self, most: int = MAX_LOGS) -> None:
        self.most = most
        self._logs: OrderedDict[str, EventLog] = OrderedDict()

    def open(self, response_id: str) -> EventLog:
        self._logs[response_id] = log = EventLog()
        while len(self._logs) > self.most:
            self._logs.popitem(last=False)
        return log

    def get(self, response_id: str) -> EventLog:
        log = self._logs.get(response_id)
        if log is None:
            raise ApiError(400, f"stream: the events of {response_id!r} are not kept (only those of background "
                           "responses, while this gateway runs): GET it without stream", param="stream")  # fmt: skip
        return log
