"""An engine node's blocks served to the other instances (kv_tiers/peer_blocks.py): route, which follows every
instance's KV events, tells the instance it chose that another holds more of a prompt's prefix, and that instance
fetches the blocks from this server instead of computing them.

The server answers from a thread of its own, and an engine is never touched by two threads at once: its node's calls
(add, step, abort, sleep, wake, close) and an answer's export take one lock (`exclusive`), so an answer waits for the
step under way and a step for the answer. An engine serves when it has tiers under its prefix cache (the fetching side
is there too) and publishes KV events (without them no router knows what it holds), on the events' host."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from sagellm.runtime.engine.kv_events.publisher import connectable
from sagellm.runtime.engine.kv_tiers.block_file import BlockKey
from sagellm.runtime.engine.kv_tiers.peer_blocks import BlockServer, Found
from sagellm.runtime.pipeline.operator import InstanceStats

Method = TypeVar("Method", bound=Callable[..., Any])


class BlockServing:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.server: BlockServer | None = None
        self._engine: Callable[[], Any] = lambda: None

    def start(self, engine: Callable[[], Any], stats: InstanceStats) -> None:
        """Serves the blocks of the engine `engine()` returns at the time of each ask (None: none, asleep), once it
        has tiers and publishes events; says where in `stats`."""
        current = engine()
        tiers = getattr(current.scheduler, "tiers", None) if current is not None else None
        events = getattr(current, "kv_events", None)
        publisher = events.publisher if events is not None else None
        if self.server is not None or tiers is None or publisher is None:
            return
        self._engine = engine
        self.server = BlockServer(_bind(publisher.endpoint), tiers.identity_sha, self._export)
        stats.kv_blocks_endpoint, stats.kv_blocks_token = connectable(self.server.endpoint), self.server.token

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def _export(self, keys: list[BlockKey]) -> Found:
        with self.lock:
            engine = self._engine()
            tiers = engine.scheduler.tiers if engine is not None else None
            return tiers.export(keys) if tiers is not None else []


def exclusive(method: Method) -> Method:
    """An engine node's method run under its `BlockServing.lock` (the node's `blocks`)."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.blocks.lock:
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


def _bind(events_endpoint: str) -> str:
    """Where to serve: a random port on the host the events are published on (a wildcard: loopback), else loopback."""
    endpoint = connectable(events_endpoint) or ""
    host = endpoint[len("tcp://") :].rpartition(":")[0] if endpoint.startswith("tcp://") else "127.0.0.1"
    return f"tcp://{host}:*"
