"""Replays prepared requests into a pipeline, open loop (each at its arrival offset, e.g. Poisson) or closed loop (a
new one whenever fewer than `max_in_flight` are in the graph), or both: the source of the benchmarks.

It is an ordinary `SourceOperator`, so benchmarks drive the real executors exactly as `sagellm run` does. A request's
`arrival_time` is its intended arrival (start + offset), or its release in closed loop: if the graph pushes back and
the source falls behind, that delay counts toward TTFT and end-to-end latency, as a client would see it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import ClassVar

from sagellm.common.errors import InvalidInput
from sagellm.runtime.pipeline.messages import Request
from sagellm.runtime.pipeline.operator import SourceOperator, register_operator


@register_operator
class ReplaySource(SourceOperator):
    """Built in code with its requests and handed to the executor (`LocalExecutor(..., operators={node_id:
    instance})`); as a registered operator, graphs naming it validate in every process."""

    name = "replay_source"
    parameter_help: ClassVar[dict[str, str]] = {
        "requests": "the requests to replay, in order (given in code: a graph file cannot write them)",
        "offsets_s": "each request's arrival, seconds after the first poll (default: all at once)",
        "max_in_flight": "closed loop: release a request only while fewer are in the graph (default: open loop)",
    }

    def __init__(
        self,
        requests: Sequence[Request] = (),
        offsets_s: Sequence[float] | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        if offsets_s is not None and len(offsets_s) != len(requests):
            raise InvalidInput(f"{len(offsets_s)} offsets for {len(requests)} requests")
        self.requests = list(requests)
        self.offsets_s = list(offsets_s) if offsets_s is not None else [0.0] * len(self.requests)
        self.max_in_flight = max_in_flight
        self.clock: Callable[[], float] = time.time
        self._next = 0
        self._start: float | None = None

    def poll(self) -> list[Request] | None:
        if self._next >= len(self.requests):
            return None
        now = self.clock()
        if self._start is None:
            self._start = now
        released: list[Request] = []
        room = None if self.max_in_flight is None else self.max_in_flight - self.ctx.load.in_flight
        while self._next < len(self.requests) and self._start + self.offsets_s[self._next] <= now:
            if room is not None and len(released) >= room:
                break
            request = self.requests[self._next]
            request.arrival_time = now if self.max_in_flight is not None else self._start + self.offsets_s[self._next]
            released.append(request)
            self._next += 1
        return released


def poisson_offsets(count: int, rate_per_s: float, seed: int = 0) -> list[float]:
    """Arrival offsets of a Poisson process (exponential gaps), the first at 0."""
    import random

    rng, t, offsets = random.Random(seed), 0.0, []
    for _ in range(count):
        offsets.append(t)
        t += rng.expovariate(rate_per_s)
    return offsets
