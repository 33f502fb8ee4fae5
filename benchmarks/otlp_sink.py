"""An OTLP/HTTP traces endpoint on 127.0.0.1, as a collector serves it (`POST /v1/traces`, protobuf): the spans
every process of a gateway exports, decoded with OpenTelemetry's own protobuf types. What the tracing tests read the
spans of a request from (`OtlpReceiver`), and the collector a tracing benchmark exports to
(`benchmarks/tracing_cost.sh`): in a process of its own, so what is measured is the exporting server's cost.

    python -m sagellm.benchmarks.otlp_sink PORT     # prints the spans it got when stopped (SIGTERM, Ctrl-C)"""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

REPLY = ExportTraceServiceResponse().SerializeToString()


@dataclass
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    name: str
    service: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)


class OtlpReceiver:
    """`with OtlpReceiver() as receiver:` ... `receiver.url`, `receiver.wait_for(trace_id, names)`."""

    def __init__(self, port: int = 0) -> None:
        self.spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                request = ExportTraceServiceRequest()
                request.ParseFromString(self.rfile.read(int(self.headers["content-length"])))
                receiver._add(request)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(REPLY)))
                self.end_headers()
                self.wfile.write(REPLY)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"

    def __enter__(self) -> OtlpReceiver:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _add(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    received = ReceivedSpan(
                        span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(), span.name,
                        str(resource.get("service.name")), span.start_time_unix_nano, span.end_time_unix_nano,
                        {a.key: _value(a.value) for a in span.attributes},
                    )  # fmt: skip
                    with self._lock:
                        self.spans.append(received)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [span for span in self.spans if span.trace_id == trace_id]

    def wait_for(self, trace_id: str, names: list[str], timeout_s: float = 20) -> list[ReceivedSpan]:
        """The trace's spans once every name of `names` came (as often as it is listed), or by the timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = [span.name for span in self.trace(trace_id)]
            if all(got.count(name) >= names.count(name) for name in names):
                break
            time.sleep(0.1)
        return self.trace(trace_id)


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def _stop(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _stop)
    with OtlpReceiver(int(sys.argv[1])) as receiver:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    names = sorted({span.name for span in receiver.spans})
    print(f"otlp_sink: {len(receiver.spans)} spans received ({', '.join(names)})")


if __name__ == "__main__":
    main()
