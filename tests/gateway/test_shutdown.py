"""A graceful stop is prompt when clients keep their connections: a kept-alive connection that carried a streamed
reply is idle again once the stream ends, so the server closes it at once instead of waiting out its graceful
timeout (30 s) for it."""

from __future__ import annotations

import time

import httpx

from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config


def test_a_stop_does_not_wait_for_kept_alive_connections_that_streamed(tiny_model, tmp_path):
    with running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path), tiny_model) as gateway:
        client = httpx.Client(base_url=gateway.url, timeout=REPLY_TIMEOUT_S)  # keeps its connection
        body = {"prompt": "Hello", "max_tokens": 4, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as reply:
            assert reply.status_code == 200 and "data: [DONE]" in list(reply.iter_lines())
        stopping = time.monotonic()
        gateway.stop()
        took = time.monotonic() - stopping
        client.close()
    assert took < 10, f"the stop took {took:.1f} s"
