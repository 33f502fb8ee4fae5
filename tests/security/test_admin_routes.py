"""The admin API starts no program a request names and adds no upstream the operator did not allow (issue 62, item 3),
against one gateway on 127.0.0.1 run as a local tool would run it: `--admin-auth loopback`, an allow-list of one
server (`--allowed-upstream 127.0.0.1:PORT`, a stub answering `/v1/models`) and, beside it, a listening socket that
no one may make the gateway call.

- A body's `command` (the reproduction: `/bin/sh -c 'id > ran.txt' sh`) is a 400 naming it, for every kind, and the
  file it would write never appears; `args` beyond the flags that tune a server, a model read as a flag and any
  field naming an environment are 400s too.
- An `openai` engine at an unlisted address (the socket beside, a metadata address however spelled, a name for a
  listed address) is a 403 naming `url`, and the address is never contacted; the listed server is registered.
- Loopback admin-auth opens no route that starts a process, reads a path or adds an upstream: without the key they
  are 401s, while the routes that only read stay keyless."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sagellm.gateway.server import GatewayThread
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config
from tests.security.listener import Listener

pytestmark = pytest.mark.slow

ADMIN_KEY = "admin-key-0123456789"
ENGINES = "/v1/management/engines"
SETTLE_S = 0.5  # how long a refused request is given to have done something anyway


class Models(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible server as far as the gateway's health check asks: `/v1/models` answers."""

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"object": "list", "data": [{"id": "upstream", "object": "model"}]}')

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def listed() -> Iterator[str]:
    """The one upstream the gateway allows: its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def trap() -> Iterator[Listener]:
    trap = Listener()
    yield trap
    trap.close()


@pytest.fixture(scope="module")
def gateway(listed: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    """A gateway with no engine of its own, keyless for local tools, allowing only `listed`."""
    config = tiny_config(tmp_path_factory.mktemp("admin"), admin_key=ADMIN_KEY, admin_auth="loopback",
                         allowed_upstreams=[listed.removeprefix("http://")])  # fmt: skip
    with running_gateway(GRAPHS / "control_plane.yaml", config) as gw:
        yield gw


def post(gateway: GatewayThread, path: str, body: dict[str, Any], key: str | None = ADMIN_KEY) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(gateway.url + path, json=body, headers=headers, timeout=REPLY_TIMEOUT_S)


def managed(gateway: GatewayThread) -> list[dict[str, Any]]:
    listed = httpx.get(gateway.url + ENGINES, timeout=REPLY_TIMEOUT_S).json()["data"]  # keyless: a read
    return [engine for engine in listed if engine["kind"] != "graph"]


def assert_refused(reply: httpx.Response, status: int, param: str | None, words: str) -> None:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"], error


@pytest.mark.parametrize("kind", ["vllm", "sglang", "llamacpp", "llm"])
def test_a_bodys_command_is_refused_and_never_runs(gateway: GatewayThread, tmp_path: Path, kind: str) -> None:
    ran = tmp_path / "ran.txt"
    reply = post(gateway, ENGINES, {"model": "x", "kind": kind, "command": f"/bin/sh -c 'id > {ran}' sh"})
    assert_refused(reply, 400, "command", "command")
    time.sleep(SETTLE_S)
    assert not ran.exists() and managed(gateway) == []


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"kind": "vllm", "args": ["--trust-remote-code"]}, "args", "'--trust-remote-code' is not a flag a request"),
        ({"kind": "vllm", "args": ["--tool-parser-plugin", "/tmp/p.py"]}, "args", "'--tool-parser-plugin' is not"),
        ({"kind": "llamacpp", "args": ["--path", "/"]}, "args", "'--path' is not a flag a request may give"),
        ({"kind": "sglang", "args": ["--enable-custom-logit-processor"]}, "args", "is not a flag a request may"),
        ({"kind": "vllm", "model": "--trust-remote-code"}, "model", "model must not start with '-'"),
        ({"kind": "vllm", "env": {"LD_PRELOAD": "/tmp/evil.so"}}, "env", "unknown field `env`"),
    ],
)
def test_flags_and_fields_that_would_run_code_or_reach_files_are_refused(
    gateway: GatewayThread, body: dict[str, Any], param: str | None, words: str
) -> None:
    assert_refused(post(gateway, ENGINES, {"model": "x", **body}), 400, param, words)
    assert managed(gateway) == []


def test_an_openai_engine_at_an_unlisted_url_is_refused_and_never_contacted(
    gateway: GatewayThread, listed: str, trap: Listener
) -> None:
    port = listed.rpartition(":")[2]
    unlisted = [
        f"http://127.0.0.1:{trap.port}/v1",  # a port of a listed host that is not the listed one
        "http://169.254.169.254/latest/meta-data",  # a cloud's metadata service
        "http://[::ffff:169.254.169.254]/",  # the same, mapped into IPv6
        "http://2852039166/",  # the same, as one number: a name, and no name is listed
        f"http://localhost:{port}",  # a name for the listed address is not the address
        "http://10.0.0.1:8000/v1",
    ]
    for url in unlisted:
        reply = post(gateway, ENGINES, {"model": "upstream", "kind": "openai", "url": url, "served_model_name": "m"})
        assert_refused(reply, 403, "url", "is not an upstream this gateway allows (allowed: 127.0.0.1:")
        assert reply.json()["error"]["code"] == "upstream_not_allowed"
    for url in (f"http://user@127.0.0.1:{port}", f"{listed}/v1?x=1"):  # a base URL has neither
        reply = post(gateway, ENGINES, {"model": "upstream", "kind": "openai", "url": url})
        assert_refused(reply, 400, "url", "url must be a server's base URL")
    time.sleep(SETTLE_S)
    assert trap.connections == 0 and managed(gateway) == []


def test_an_openai_engine_at_a_listed_url_is_registered(gateway: GatewayThread, listed: str) -> None:
    body = {"model": "upstream", "kind": "openai", "url": listed + "/v1", "served_model_name": "listed"}
    created = post(gateway, ENGINES, body)
    assert created.status_code == 201, created.text
    engine_id = created.json()["id"]
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    try:
        deadline = time.monotonic() + 30
        while (engine := httpx.get(f"{gateway.url}{ENGINES}/{engine_id}").json())["state"] != "ready":
            assert time.monotonic() < deadline, engine
            time.sleep(0.05)
        assert engine["url"] == listed and engine["model"] == "listed"
    finally:
        httpx.delete(f"{gateway.url}{ENGINES}/{engine_id}?force=true", headers=admin, timeout=REPLY_TIMEOUT_S)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (ENGINES, {"model": "x", "kind": "vllm"}),  # starts a server
        (ENGINES, {"model": "x"}),  # starts an engine of ours
        (ENGINES, {"model": "upstream", "kind": "openai", "url": "http://127.0.0.1:9"}),  # adds an upstream
        ("/models/load", {"model": "x"}),  # starts a model on demand's engine
        ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/etc"}),  # reads a path with the gateway's rights
    ],
)
@pytest.mark.parametrize("key", [None, "wrong-key-0123456789"])
def test_loopback_admin_auth_opens_no_route_that_starts_a_process_or_adds_an_upstream(
    gateway: GatewayThread, path: str, body: dict[str, Any], key: str | None
) -> None:
    reply = post(gateway, path, body, key=key)
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key", reply.text
    assert managed(gateway) == []


def test_loopback_admin_auth_still_lets_local_tools_read_and_steer_without_a_key(gateway: GatewayThread) -> None:
    for path in (ENGINES, "/v1/management/models", "/admin/metrics", "/is_sleeping"):
        assert httpx.get(gateway.url + path, timeout=REPLY_TIMEOUT_S).status_code != 401, path
