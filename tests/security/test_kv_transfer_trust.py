"""A caller's `kv_transfer_params` make the server connect to no host its operator did not list (issue 62, item 1).
The reproduction: any caller's `{"do_remote_prefill": true, "remote_host", "remote_port", "remote_request_id"}` made
the server GET http://HOST:PORT/v1/kv_transfer/ID from the host it named, and put the reply into the prefix cache
every user shares. Replayed here against gateways on 127.0.0.1, with listening sockets beside them that count the
connections made to them:

- a server started without `--kv-transfer-role` refuses the field with a 400 naming it, and connects nowhere;
- a consumer (`--kv-transfer-role consumer --kv-transfer-peers ...`) refuses, before any connection, a host or port
  it does not list, a host that is more than a host (`127.0.0.1/x#` choosing the path, `user@127.0.0.1`, a port of
  its own) and a name that is not the one listed (a caller's name is never resolved);
- a listed peer is reached, by its address, by a listed name's address, and by the name in other case (the socket
  answers nothing, so the fetch ends in a 503). A real prefill server listed is
  `tests/gateway/test_pd_across_servers.py`'s."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sagellm.cli.serve_cmd import _config
from sagellm.cli.serve_flags import add_serve_arguments
from sagellm.common.errors import InvalidInput
from sagellm.gateway.config import KVTransferSettings
from sagellm.gateway.server import GatewayThread
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config
from tests.security.listener import Listener
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow

PARAM = "kv_transfer_params"
SETTLE_S = 0.3  # how long a refused request is given to have connected anyway


@pytest.fixture(scope="module")
def listeners() -> Iterator[dict[str, Listener]]:
    """`unlisted`: a port no server lists; `listed`: listed as 127.0.0.1:PORT; `named`: listed as LocalHost:PORT."""
    opened = {name: Listener() for name in ("unlisted", "listed", "named")}
    yield opened
    for listener in opened.values():
        listener.close()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("kv-trust") / "tiny-llama")


@pytest.fixture(scope="module")
def plain(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    """A server as `sagellm serve` starts it without the flags: no part in disaggregated serving."""
    with running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path_factory.mktemp("plain")), tiny_model) as gw:
        yield gw


@pytest.fixture(scope="module")
def consumer(
    tiny_model: Path, listeners: dict[str, Listener], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayThread]:
    """A decode server of PD across servers, fetching KV from the two listed sockets alone."""
    peers = (f"127.0.0.1:{listeners['listed'].port}", f"LocalHost:{listeners['named'].port}")
    config = tiny_config(tmp_path_factory.mktemp("consumer"), kv_transfer=KVTransferSettings("consumer", peers))
    with running_gateway(GRAPHS / "colocated.yaml", config, tiny_model) as gw:
        yield gw


def remote_prefill(host: Any, port: Any) -> dict[str, Any]:
    return {"do_remote_prefill": True, "remote_host": host, "remote_port": port, "remote_request_id": "abc"}


def complete(server: GatewayThread, params: dict[str, Any], path: str = "/v1/completions") -> httpx.Response:
    body = {"prompt": "x", "max_tokens": 1, PARAM: params}
    if path == "/v1/chat/completions":
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, PARAM: params}
    return httpx.post(server.url + path, json=body, timeout=REPLY_TIMEOUT_S)


def assert_refused(reply: httpx.Response, words: str) -> None:
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == PARAM and words in error["message"], error


def test_a_server_started_without_a_role_refuses_the_field_and_connects_nowhere(plain, listeners):
    """The reproduction as filed, on both routes; and the prefill half (`do_remote_decode`), not served either."""
    trap = listeners["unlisted"]
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert_refused(complete(plain, remote_prefill("127.0.0.1", trap.port), path), "--kv-transfer-role")
    assert_refused(complete(plain, {"do_remote_decode": True}), "--kv-transfer-role")
    assert complete(plain, {"do_remote_decode": False, "do_remote_prefill": False}).status_code == 200  # asks none
    time.sleep(SETTLE_S)
    assert trap.connections == 0


def test_a_consumer_refuses_unlisted_and_malformed_hosts_before_connecting(consumer, listeners):
    listed, unlisted = listeners["listed"].port, listeners["unlisted"].port
    refused = [
        (("127.0.0.1", unlisted), "no prefill server this server fetches KV from"),
        (("localhost", listed), "no prefill server"),  # 127.0.0.1 is listed; a caller's name is not resolved
        (("127.0.0.1/x#", listed), "a host name or an IP address alone"),
        (("user@127.0.0.1", listed), "alone"),
        ((f"127.0.0.1:{listed}", listed), "alone"),
        (("127.0.0.1?q=", listed), "alone"),
        (("127.1", listed), "alone"),
        (("127.0.0.1 ", listed), "alone"),
        (("", listed), "needs remote_host, remote_port and remote_request_id"),
        (("127.0.0.1", str(listed)), "needs remote_host"),
        (("127.0.0.1", True), "needs remote_host"),
        (("127.0.0.1", 0), "needs remote_host"),
    ]
    for (host, port), words in refused:
        assert_refused(complete(consumer, remote_prefill(host, port)), words)
    wrong_id = remote_prefill("127.0.0.1", listed) | {"remote_request_id": "../../v1/models"}
    assert_refused(complete(consumer, wrong_id), "remote_request_id")
    assert_refused(complete(consumer, {"do_remote_decode": True}), "--kv-transfer-role consumer, not producer")
    time.sleep(SETTLE_S)
    assert {name: listener.connections for name, listener in listeners.items()} == {
        "unlisted": 0, "listed": 0, "named": 0
    }  # fmt: skip


def test_a_listed_peer_is_reached_by_address_or_name(consumer, listeners):
    """What the operator listed is fetched from: the socket answers nothing, so each fetch is a 503 (the decode is
    retried from the prefill, as vLLM's proxies do), after one connection each."""
    for host, name in (("127.0.0.1", "listed"), ("LOCALHOST", "named"), ("127.0.0.1", "named")):
        listener = listeners[name]
        before = listener.connections
        reply = complete(consumer, remote_prefill(host, listener.port))
        assert reply.status_code == 503 and "the prefill server at" in reply.json()["error"]["message"], reply.text
        deadline = time.monotonic() + 5
        while listener.connections == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert listener.connections > before, (host, name)
    assert listeners["unlisted"].connections == 0


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_flags_are_the_settings_and_a_part_without_its_peers_is_refused():
    peers = ("--kv-transfer-peers", "a:1, b:2", "--kv-transfer-peers", "[::1]:3")  # comma-separated and repeated
    args = serve_args("--kv-transfer-role", "consumer", *peers)
    assert _config(args, None, "m").kv_transfer == KVTransferSettings("consumer", ("a:1", "b:2", "[::1]:3"))
    assert _config(serve_args(), None, "m").kv_transfer is None  # off unless the operator turns it on
    refused = [
        (("--kv-transfer-role", "consumer"), "give at least one HOST:PORT"),
        (("--kv-transfer-role", "producer", "--kv-transfer-peers", "a:1"), "a producer fetches none"),
        (("--kv-transfer-peers", "a:1"), "give --kv-transfer-role consumer"),
        (("--kv-transfer-role", "both", "--kv-transfer-peers", "a/b:1"), "HOST:PORT"),
        (("--kv-transfer-role", "both", "--kv-transfer-peers", "user@a:1"), "HOST:PORT"),
        (("--kv-transfer-role", "both", "--kv-transfer-peers", "::1:80"), "[ADDRESS]:PORT for IPv6"),
        (("--kv-transfer-role", "producer", "--api-servers", "2"), "drop --api-servers"),
    ]
    for argv, words in refused:
        with pytest.raises(InvalidInput, match=words.replace("[", r"\[").replace("]", r"\]")):
            _config(serve_args(*argv), None, "m")
