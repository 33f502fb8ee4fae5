"""Request traces with OpenTelemetry, exported with OTLP over HTTP (`--otlp-traces-endpoint`, vLLM's flag).

A traced request carries its trace in the pipeline's messages (`Request.trace`: the trace id, and the span its
parts are children of), so every process that works on it (the gateway's core, prefill and decode workers, another
instance after a failover) records its own spans into the one trace and exports them itself; an API server hands
the client's context on with the request. Spans are
recorded once their times are known (`record`), as vLLM records a request's span when it ends: nothing is held open
across processes, and a step of the engine costs a traced request nothing until it ends. With no endpoint set
nothing here is imported beyond this module and every hook is a check of `Request.trace is None`.

W3C trace context: a client's `traceparent` header makes its span the parent of the request's (a header marked not
sampled turns tracing off for that request)."""

from __future__ import annotations

import contextvars
import os
import re
from collections.abc import Mapping
from typing import Any

import msgspec

from sagellm.common.errors import InvalidInput

ENDPOINT_ENV = "SAGELLM_OTLP_TRACES_ENDPOINT"  # how worker processes learn the endpoint: they inherit it
EXPORT_DELAY_MS = 500  # spans are batched and sent this often (OTel's default: 5 s)
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

# The `traceparent` of the HTTP request being answered (set by the app for its handler's task): what a request
# submitted from it is a child of.
incoming: contextvars.ContextVar[str | None] = contextvars.ContextVar("traceparent", default=None)


class TraceContext(msgspec.Struct, array_like=True, frozen=True):
    """Where a request's spans go: its trace, and the span they are children of. Empty: a trace not begun yet (a
    request whose client sent no `traceparent`), whose first span is its root."""

    trace_id: str = ""  # 32 hex digits
    span_id: str = ""  # 16 hex digits


class _Tracing:
    """The process's exporter, once configured."""

    def __init__(self) -> None:
        self.tracer: Any = None
        self.provider: Any = None
        self.endpoint: str | None = None


_state = _Tracing()


def configure(endpoint: str, service: str) -> None:
    """Exports this process's spans to `endpoint` (an OTLP/HTTP traces URL, `http://HOST:4318/v1/traces`) as
    `service`; the processes it starts afterwards inherit the endpoint. Raises InvalidInput without the SDK."""
    if _state.endpoint == endpoint:
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise InvalidInput(
            "--otlp-traces-endpoint needs the OpenTelemetry SDK: pip install 'sagellm[tracing]'"
        ) from None
    shutdown()
    resource = Resource.create({"service.name": service, "process.pid": os.getpid()})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint), schedule_delay_millis=EXPORT_DELAY_MS))
    _state.provider, _state.tracer, _state.endpoint = provider, provider.get_tracer("sagellm"), endpoint
    os.environ[ENDPOINT_ENV] = endpoint


def configure_from_env(service: str) -> None:
    """A worker process: traces where its parent's go, if it traces."""
    endpoint = os.environ.get(ENDPOINT_ENV)
    if endpoint:
        configure(endpoint, service)


def shutdown() -> None:
    """Sends what is batched and stops exporting (a process that ends, or a test that is done)."""
    if _state.provider is not None:
        _state.provider.shutdown()
    _state.provider = _state.tracer = _state.endpoint = None
    os.environ.pop(ENDPOINT_ENV, None)


def flush() -> None:
    """Sends the spans batched so far (a gateway that stops: its workers stop with it)."""
    if _state.provider is not None:
        _state.provider.force_flush()


def enabled() -> bool:
    return _state.tracer is not None


def incoming_context() -> TraceContext | None:
    """The trace a request submitted now belongs to: the client's (`traceparent`), else a new one; None when this
    process does not trace or the client's header says not to sample."""
    if not enabled():
        return None
    header = incoming.get()
    if header:
        parsed = parse_traceparent(header)
        if parsed is not None:
            trace_id, span_id, sampled = parsed
            return TraceContext(trace_id, span_id) if sampled else None
    return TraceContext()


def parse_traceparent(header: str) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a W3C `traceparent`; None for a malformed one (ignored, as the
    spec says)."""
    match = _TRACEPARENT.match(header.strip().lower())
    if match is None or set(match[1]) == {"0"} or set(match[2]) == {"0"}:
        return None
    return match[1], match[2], bool(int(match[3], 16) & 1)


def traceparent(context: TraceContext) -> str:
    """The W3C header naming `context`'s span as the parent of a call's spans on another server (sampled)."""
    return f"00-{context.trace_id}-{context.span_id}-01"


def start(name: str, parent: TraceContext, start_s: float, attributes: Mapping[str, Any] | None = None) -> Any:
    """A span begun at `start_s` (wall clock), ended later with `end`: one whose id its children need first (the
    gateway's span of a request). None when this process does not trace."""
    if _state.tracer is None:
        return None
    return _state.tracer.start_span(name, context=_parent(parent), start_time=_ns(start_s),
                                    attributes=dict(attributes or {}))  # fmt: skip


def context_of(span: Any) -> TraceContext:
    """The context a started span's children take."""
    context = span.get_span_context()
    return TraceContext(format(context.trace_id, "032x"), format(context.span_id, "016x"))


def end(span: Any, end_s: float, attributes: Mapping[str, Any] | None = None, error: str | None = None) -> None:
    if span is None:
        return
    if attributes:
        span.set_attributes(dict(attributes))
    if error is not None:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=_ns(end_s))


def record(
    name: str, parent: TraceContext | None, start_s: float, end_s: float, attributes: Mapping[str, Any] | None = None
) -> None:
    """A finished span of the request `parent` names (nothing when it is not traced or this process does not
    trace): its start and end on the wall clock, which every process of a run shares."""
    if parent is None or not parent.trace_id or _state.tracer is None:
        return
    end(start(name, parent, start_s, attributes), end_s)


def _parent(parent: TraceContext) -> Any:
    """The OTel context a span under `parent` starts in: a remote parent span, or none (a new trace's root)."""
    from opentelemetry import context, trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    if not parent.trace_id:
        return context.Context()  # empty: the span is a root, in a trace the SDK starts
    span = SpanContext(int(parent.trace_id, 16), int(parent.span_id, 16), is_remote=True, trace_flags=TraceFlags(1))
    return trace.set_span_in_context(NonRecordingSpan(span))


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
