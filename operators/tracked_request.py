"""What an engine node keeps of each request it serves (`TrackedRequest`): its metrics' timeline, and, when traced,
its span on the engine with the steps it took part in as children (its prompt's chunks, its decoding steps).

Times are wall clock from the request's own arrival, so they mean the same whichever process served which phase;
the instant engine of the benchmarks (W5, no model compute) keeps its requests the same way."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sagellm.common import tracing
from sagellm.runtime.engine.outputs import RequestMetrics
from sagellm.runtime.pipeline.messages import Request


@dataclass
class TrackedRequest:
    """An engine node's record of one request: what its metrics and its span are made of."""

    request: Request
    metrics: RequestMetrics
    prefilled_elsewhere: bool = False  # a PrefillDone: its cache hits were counted by the prefill worker
    received: float = field(default_factory=time.time)  # when this engine took it: its span's start
    # Its steps here, children of its span when traced: its prompt's chunks (start, end, tokens; noted only when
    # traced), and its decoding steps after the first token (decoding began with it).
    chunks: list[tuple[float, float, int]] = field(default_factory=list)
    decode_steps: int = 0

    @classmethod
    def of(cls, request: Request) -> TrackedRequest:
        return cls(
            request, RequestMetrics(arrival_time=request.arrival_time, first_scheduled_time=request.dispatched_time)
        )

    def token(self, now: float, count: int = 1) -> None:
        """`count` new output tokens at `now`."""
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        else:
            self.decode_steps += 1
        self.metrics.num_output_tokens += count

    def finish(self, now: float) -> RequestMetrics:
        """The metrics of the finished request, its SLO judged."""
        self.metrics.finished_time = now
        self.metrics.slo_met = self.request.slo_met(self.metrics)
        return self.metrics

    def span(self, name: str, node_id: str, now: float, error: str | None = None, **attributes: Any) -> None:
        """Its span on this engine (`name`: the engine's part), when the request is traced."""
        if self.request.trace is None:
            return
        m = self.metrics
        attributes |= {"sagellm.node": node_id, "gen_ai.usage.input_tokens": m.num_prompt_tokens,
                       "gen_ai.usage.output_tokens": m.num_output_tokens, "sagellm.cached_tokens": m.num_cached_tokens,
                       "sagellm.resumed_tokens": self.request.resumed_tokens}  # fmt: skip
        if m.first_token_time is not None:
            attributes["sagellm.first_token_s"] = m.first_token_time - self.received
        if error is not None:
            attributes["error.type"] = error
        span = tracing.start(name, self.request.trace, self.received, attributes)
        if span is None:
            return
        steps = tracing.context_of(span)
        for index, (start, end, tokens) in enumerate(self.chunks):
            tracing.record("prefill_chunk", steps, start, end, {"sagellm.chunk": index, "sagellm.chunk_tokens": tokens})
        if self.decode_steps and m.first_token_time is not None:
            tracing.record("decode_steps", steps, m.first_token_time, now, {"sagellm.steps": self.decode_steps})
        tracing.end(span, now, error=error)
