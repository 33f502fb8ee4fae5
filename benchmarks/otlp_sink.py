"""An OTLP/HTTP traces endpoint that counts what it gets and keeps nothing: the collector a tracing benchmark exports
to (`benchmarks/tracing_cost.sh`), so what is measured is the exporting server's cost, not a collector's.

    python -m sagellm.benchmarks.otlp_sink PORT     # prints the spans it got when stopped (SIGTERM, Ctrl-C)"""

from __future__ import annotations

import contextlib
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

REPLY = ExportTraceServiceResponse().SerializeToString()


class Sink(BaseHTTPRequestHandler):
    spans = 0

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        request = ExportTraceServiceRequest()
        request.ParseFromString(self.rfile.read(int(self.headers["content-length"])))
        Sink.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(REPLY)))
        self.end_headers()
        self.wfile.write(REPLY)

    def log_message(self, *args: object) -> None:
        pass


def _stop(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink)
    signal.signal(signal.SIGTERM, _stop)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    print(f"otlp_sink: {Sink.spans} spans received")


if __name__ == "__main__":
    main()
