"""A plain HTTP server on 127.0.0.1 serving fixed files (and redirects), where the media tests' clients fetch images
and clips from: a real server, so the gateway's fetch runs its whole path (host check, redirect refusal, caps)."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator, Mapping


@contextlib.contextmanager
def file_server(files: Mapping[str, bytes], redirects: Mapping[str, str] | None = None) -> Iterator[str]:
    """Serve `files` by path, each path of `redirects` as a 302 to its target, anything else a 404; yields the base
    URL."""

    class Files(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path in (redirects or {}):
                self.send_response(302)
                self.send_header("Location", redirects[self.path])
                self.end_headers()
                return
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
