"""The attempts the serving core runs in its graph, each one a client stream's (`RequestStream`): which stream an
item from the graph goes to, how an attempt is taken back, cancelled or retried, which ones stalled, and the status
of the requests live and of the latest that ended (`GET /v1/requests/{id}`).

The executor keeps no per-request state after a request ends; this table is the gateway's. It is a collaborator of
`core.ServingCore`, which creates the streams (`open`) and runs the expiry loop (`expire_stalled`); the streams ask it
for their next attempts (`request_stream.Attempts`)."""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec
import trio

from sagellm.gateway.config import FailoverPolicy
from sagellm.gateway.serving.instances import InstanceRegistry
from sagellm.gateway.serving.kv_outbox import KVOutbox
from sagellm.gateway.serving.readiness import ModelReadiness
from sagellm.gateway.serving.request_stream import RequestStream
from sagellm.operators.http_source import HttpSource
from sagellm.runtime.executor.local import LocalExecutor
from sagellm.runtime.pipeline.messages import Request, RequestError, TokenDelta, is_terminal

STALL_CHECK_S = 0.1  # how often running attempts are checked against their token deadlines
RECENT_REQUESTS = 10_000  # ended requests whose status is still kept (GET /v1/requests/{id})


class AttemptTable:
    def __init__(
        self,
        source: HttpSource,
        local: Callable[[], LocalExecutor | None],
        registry: InstanceRegistry,
        readiness: ModelReadiness,
        kv_outbox: KVOutbox,
        retries: Counter[tuple[str, bool]],
    ) -> None:
        """`local`: the executor of the core's process, once it runs (attempts are withdrawn and cancelled there);
        `retries`: where retries are counted, by failure code and whether they resumed after tokens (the core's
        metrics read them)."""
        self.source, self._local, self.registry = source, local, registry
        self.readiness, self.kv_outbox, self.retries = readiness, kv_outbox, retries
        self._streams: dict[str, RequestStream] = {}  # by the id of the attempt running now
        self._live: dict[str, RequestStream] = {}  # by the client's request id, until the request ends
        # ended requests' owner and last status, oldest first
        self.recent: OrderedDict[str, tuple[str, dict[str, Any]]] = OrderedDict()
        self.on_ended: Callable[[RequestStream], None] = lambda stream: None

    @property
    def in_flight(self) -> int:
        """Attempts running now (each live request has one, until its last item arrived)."""
        return len(self._streams)

    def in_use(self, request_id: str) -> bool:
        return request_id in self._streams

    def open(self, request: Request, failover: FailoverPolicy) -> RequestStream:
        """A client request's stream, its first attempt `request` (which the core submits to the graph)."""
        stream = self._streams[request.request_id] = self._live[request.request_id] = RequestStream(
            self, request, failover
        )
        return stream

    def resubmit(self, stream: RequestStream, attempt: Request) -> bool:
        """Sends a stream's next attempt into the graph; False if the gateway is shutting down."""
        if self.source.finished:
            return False
        self._streams[attempt.request_id] = stream
        self.source.submit(attempt)
        return True

    def cancel(self, request_id: str) -> None:
        """Aborts an attempt wherever it is: taken back while it waits for an engine, else aborted where it runs."""
        local = self._local()
        if not self.take_back(request_id) and local is not None and request_id in self._streams:
            local.cancel(request_id)

    def take_back(self, request_id: str) -> bool:
        """Ends an attempt still waiting for an engine (not yet polled from the source, or in a policy queue here);
        False, and nothing done, when it reached one. What it still sends is dropped."""
        if request_id not in self._streams:
            return False
        local = self._local()
        taken = self.source.withdraw(request_id) or (local is not None and local.withdraw(request_id))
        if taken:
            del self._streams[request_id]
        return taken

    def abandon(self, request_id: str) -> None:
        """Cancels an attempt whose stream gave up on it; whatever it still sends is dropped."""
        self.cancel(request_id)
        self._streams.pop(request_id, None)

    def count_retry(self, code: str, resumed: bool) -> None:
        self.retries[code, resumed] += 1

    def ended(self, stream: RequestStream) -> None:
        """A request's client got its last item (or left): its status is kept among the recent ones, and what it
        produced counted for its key (`on_ended`)."""
        if self._live.pop(stream.request.request_id, None) is not None:
            self.readiness.left(stream.request.model)
            self.on_ended(stream)
        self.recent[stream.request.request_id] = (stream.request.owner, stream.status())
        while len(self.recent) > RECENT_REQUESTS:
            self.recent.popitem(last=False)

    def request_status(self, request_id: str, owner: str) -> dict[str, Any] | None:
        """A request's status while it runs and for a while after (the last RECENT_REQUESTS ended), for its `owner`
        alone; None: unknown, or another's."""
        stream = self._live.get(request_id)
        if stream is not None:
            return stream.status() if stream.request.owner == owner else None
        recent_owner, status = self.recent.get(request_id, ("", None))
        return status if recent_owner == owner else None

    async def expire_stalled(self, queue_timeout_s: float | None) -> None:
        """Times out the attempts that stopped giving items (`RequestStream.expire_if_stalled`), a few times a
        second: deadlines are minutes by default, and a timer per stream wait would cost every token a cancel
        scope."""
        while True:
            await trio.sleep(STALL_CHECK_S)
            now, wall = trio.current_time(), time.time()
            for stream in list(self._streams.values()):
                stream.expire_if_stalled(now)
                if queue_timeout_s is not None:
                    stream.expire_if_queued_too_long(wall, queue_timeout_s)

    def deliver(self, item: Any) -> None:
        """An item that reached a leaf of the graph, to its attempt's stream (dropped when none is waiting)."""
        rid = getattr(item, "request_id", None)
        stream = self._streams.get(rid)
        if stream is None:
            return
        if isinstance(item, TokenDelta) and item.kv is not None:  # a prefill for a decode server: its KV waits here
            prompt = stream.attempt.prompt_token_ids or []
            self.kv_outbox.put(stream.request.request_id, prompt, item.token_ids[0], item.kv.data, item.kv.states)
            item = msgspec.structs.replace(item, kv=None)
        stream.deliver(item)
        if is_terminal(item):
            del self._streams[rid]

    def end_all(self, message: str) -> None:
        """Every attempt still open ends now, with `message` (the executor failed them)."""
        for rid in list(self._streams):
            self.deliver(RequestError(request_id=rid, code="internal", message=message))
