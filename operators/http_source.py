"""The gateway's source: where requests accepted over HTTP enter the graph.

The operator does no I/O, like every operator: the gateway (`sagellm.gateway`) owns the HTTP server and hands each
parsed request to `submit()`, which queues it for the executor's next `poll()` and wakes the executor so the
request does not wait for an idle tick; `withdraw()` takes back one not polled yet (its client left). `finish()` ends
the stream (server shutdown): what was queued still enters, then the source is exhausted and the graph drains."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sagellm.common.errors import Unavailable
from sagellm.runtime.pipeline.operator import OperatorContext, SourceOperator, register_operator
from sagellm.runtime.pipeline.served_model import ServedModel, served_model


@register_operator
class HttpSource(SourceOperator):
    name = "http_source"
    wakes = True

    def __init__(self) -> None:
        self._queue: dict[str, Any] = {}  # by request id, in arrival order
        self.finished = False
        self.wake: Callable[[], None] = lambda: None  # the gateway sets the executor's `wake_sources`
        self.model: ServedModel | None = None  # what the gateway reads of the graph's model, once open

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        self.model = served_model(ctx.graph_attrs)

    def submit(self, item: Any) -> None:
        if self.finished:
            raise Unavailable("the gateway is shutting down")
        self._queue[item.request_id] = item
        self.wake()

    def withdraw(self, request_id: str) -> bool:
        """Takes back a request not polled yet; False when it has entered the graph (or was never here)."""
        return self._queue.pop(request_id, None) is not None

    def __len__(self) -> int:
        """Requests submitted and not polled yet."""
        return len(self._queue)

    def finish(self) -> None:
        self.finished = True
        self.wake()

    def poll(self) -> list[Any] | None:
        if not self._queue:
            return None if self.finished else []
        items = list(self._queue.values())
        self._queue.clear()
        return items
