"""A Hugging Face Hub of one repository on 127.0.0.1, for the downloads this machine cannot make (it reaches no hub):
what `huggingface_hub` asks to list a model's files (`GET /api/models/{id}/revision/{rev}`, with each file's size
and digest: sha256 for safetensors, stored as LFS on the Hub, a git blob id for the others) and to fetch one (`HEAD`,
then `GET /{id}/resolve/{rev}/{file}`), answered from a directory. `requests` counts the file fetches, so a test can
tell a download from a cache hit."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubDouble:
    repo_id: str
    directory: Path
    url: str = ""
    requests: list[str] = field(default_factory=list)  # the files fetched (GET), in order

    def siblings(self) -> list[dict[str, object]]:
        listed = []
        for path in sorted(p for p in self.directory.rglob("*") if p.is_file()):
            data = path.read_bytes()
            sibling: dict[str, object] = {"rfilename": path.relative_to(self.directory).as_posix(), "size": len(data),
                                          "blobId": _git_blob_id(data)}  # fmt: skip
            if path.suffix == ".safetensors":
                sibling["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            listed.append(sibling)
        return listed


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 -- git's object id


@contextmanager
def hub_double(repo_id: str, directory: Path) -> Iterator[HubDouble]:
    hub = HubDouble(repo_id, directory)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:  # quiet: the test's output is its own
            return None

        def do_GET(self) -> None:  # noqa: N802 -- http.server's name
            self._answer(send_body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(send_body=False)

        def _answer(self, send_body: bool) -> None:
            path = unquote(urlparse(self.path).path)
            if path.startswith(f"/api/models/{repo_id}"):
                body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": COMMIT, "siblings": hub.siblings()})
                return self._send(200, body.encode(), {"Content-Type": "application/json"}, send_body)
            prefix = f"/{repo_id}/resolve/"
            if not path.startswith(prefix):
                return self._send(404, b'{"error": "Repository not found"}', {}, send_body)
            name = path[len(prefix) :].split("/", 1)[1]
            file = hub.directory / name
            if not file.is_file():
                return self._send(404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"}, send_body)
            data = file.read_bytes()
            etag = hashlib.sha256(data).hexdigest() if file.suffix == ".safetensors" else _git_blob_id(data)
            if send_body:
                hub.requests.append(name)
            return self._send(200, data, {"ETag": f'"{etag}"', "X-Repo-Commit": COMMIT}, send_body)

        def _send(self, status: int, data: bytes, headers: dict[str, str], send_body: bool) -> None:
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(key, value)
            self.end_headers()
            if send_body:
                self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="hub-double", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
