"""A traced request's span in the serving core: from its arrival to the last item its client got, every attempt
(and every process and instance they went through) beneath it, and the door's admission as its first child.

The request arrives with its trace (`Request.trace`: the client's `traceparent`, or a new trace, stamped by the route
that made it here or on an API server); the core's span becomes the parent of every span recorded after it, in this
process or another, by giving the request (and so each attempt, a failover's resume too) its context."""

from __future__ import annotations

import time
from typing import Any

from sagellm.common import tracing
from sagellm.runtime.pipeline.messages import Embedding, Request, RequestError, TokenDelta

SPAN = "sagellm.request"


class RequestTraces:
    """The open spans of the traced requests in flight, by request id."""

    def __init__(self) -> None:
        self._open: dict[str, Any] = {}

    def open(self, requests: list[Request]) -> None:
        """Stamps requests that carry no trace with the incoming one, and begins each traced request's span."""
        if not tracing.enabled():
            return
        for request in requests:
            if request.trace is None:
                request.trace = tracing.incoming_context()
            if request.trace is None:
                continue
            attributes = {"sagellm.request_id": request.request_id, "gen_ai.request.model": request.model or "",
                          "sagellm.priority": request.priority}  # fmt: skip
            span = tracing.start(SPAN, request.trace, request.arrival_time, attributes)
            self._open[request.request_id] = span
            request.trace = tracing.context_of(span)

    def admitted(self, requests: list[Request], started: float) -> None:
        """The door let them in (admission's checks, tokenizing included) between `started` and now."""
        now = time.time()
        for request in requests:
            attributes = {"sagellm.prompt_tokens": request.num_prompt_tokens}
            tracing.record("admission", request.trace, started, now, attributes)

    def close(self, request_id: str, outcome: TokenDelta | Embedding | RequestError | None, retries: int,
              output_tokens: int) -> None:  # fmt: skip
        """The request's client got its last item (`outcome`; None: it left first)."""
        span = self._open.pop(request_id, None)
        if span is None:
            return
        attributes: dict[str, Any] = {"sagellm.retries": retries, "gen_ai.usage.output_tokens": output_tokens}
        error = None
        if isinstance(outcome, RequestError):
            attributes["error.type"], error = outcome.code, outcome.message
        elif isinstance(outcome, TokenDelta):
            attributes["gen_ai.response.finish_reasons"] = [outcome.finish_reason or ""]
        elif outcome is None:
            attributes["sagellm.cancelled"] = True
        tracing.end(span, time.time(), attributes, error)
