"""A benchmark fixture, not an engine: a Step operator that streams a fixed number of tokens per request with no model
and no compute, so that whatever time a pipeline spends around it is the pipeline's own (workload W5).

It plays an engine node's part in the graph exactly: role "colocated" (route picks it), `capacity()` from
`max_running`, its `InstanceStats` kept current, and per-request `RequestMetrics` kept by the real engine
operator's `TrackedRequest`, wall clock from `Request.arrival_time`. Each `step()` emits one `TokenDelta` per held
request; a request's `tokens`-th delta ends it with finish_reason "length". Registered as "instant_engine" only when
this module is imported (benchmarks and their tests), never among the built-in operators."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar

from sagellm.operators.tracked_request import TrackedRequest
from sagellm.runtime.pipeline.messages import Request, RequestError, TokenDelta
from sagellm.runtime.pipeline.operator import (
    InstanceStats,
    OperatorContext,
    OperatorError,
    StepOperator,
    register_operator,
)


@register_operator
class InstantEngine(StepOperator):
    """Benchmark fixture: `tokens` tokens per request (token ids 0, 1, ...), one per step, no model."""

    inline = True  # nothing to compute: a thread hop per step would cost more than the step

    name = "instant_engine"
    role: ClassVar[str] = "colocated"
    accepts = (Request,)

    def __init__(self, tokens: int = 16, max_running: int = 1024, reply: str = "") -> None:
        """`tokens`: output tokens per request (W5 replies are 16); `max_running`: requests held at once; `reply`:
        text the deltas carry, one word each (cycled), as a real stream carries its tokens' text (empty: none)."""
        if tokens < 1:
            raise OperatorError(f"instant_engine: tokens must be >= 1, got {tokens}")
        if max_running < 1:
            raise OperatorError(f"instant_engine: max_running must be >= 1, got {max_running}")
        self.tokens = tokens
        self.max_running = max_running
        words = reply.split()
        self._texts = [(" " if i else "") + words[i % len(words)] for i in range(tokens)] if words else [""] * tokens
        self.clock: Callable[[], float] = time.time
        self._held: dict[str, TrackedRequest] = {}
        self.stats = InstanceStats(self.name, max_running=max_running)  # replaced by the graph's own in open()

    @classmethod
    def instance_stats(cls, node_id: str, params: dict[str, Any]) -> InstanceStats:
        return InstanceStats(node_id, role=cls.role, max_running=cls(**params).max_running)

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        self.stats = ctx.instances.setdefault(ctx.node_id, InstanceStats(ctx.node_id))
        self.stats.role, self.stats.max_running = self.role, self.max_running
        self._refresh_stats()

    def add(self, item: Request) -> list[Any]:
        rid = item.request_id
        if rid in self._held:
            return [RequestError(request_id=rid, code="invalid_request", message=f"request id {rid!r} is in use")]
        self._held[rid] = tracked = TrackedRequest.of(item)
        tracked.metrics.num_prompt_tokens = item.num_prompt_tokens
        self._refresh_stats()
        return []

    def step(self) -> list[TokenDelta]:
        now = self.clock()
        deltas = []
        for rid, tracked in list(self._held.items()):
            index = tracked.metrics.num_output_tokens
            delta = TokenDelta(request_id=rid, token_ids=[index], text=self._texts[index], time=now)
            tracked.token(now)
            if tracked.metrics.num_output_tokens == self.tokens:
                del self._held[rid]
                delta.finish_reason = "length"
                delta.metrics = tracked.finish(now)
            deltas.append(delta)
        self._refresh_stats()
        return deltas

    def has_work(self) -> bool:
        return bool(self._held)

    def capacity(self) -> int:
        return self.max_running - len(self._held)

    def in_flight(self) -> list[str]:
        return list(self._held)

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._held.pop(rid, None)
        self._refresh_stats()

    def _refresh_stats(self) -> None:
        """What route's strategies read, as the real engine reports it: held requests and tokens still to stream."""
        self.stats.running = len(self._held)
        self.stats.queued_decode_tokens = self.tokens * len(self._held) - sum(
            t.metrics.num_output_tokens for t in self._held.values()
        )
