"""Work nobody waits for stops, and refusals come at the door: one gateway whose engine holds 2 requests
and whose admission lets 8 in, on a tiny model with a long context so that two streams keep it busy."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from sagellm.gateway.config import FailoverPolicy
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config
from tests.tiny_models import make_tiny_llama

MAX_QUEUE = 8
QUEUE_TIMEOUT_S = 3.0  # longer than any other test here keeps a request queued
KEYS = {"alice": "sk-alice", "bob": "sk-bob"}
LONG = {"prompt": "Hello", "max_tokens": 16000, "temperature": 0, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    model = make_tiny_llama(tmp_path_factory.mktemp("long") / "tiny-llama", max_position_embeddings=16384)
    failover = FailoverPolicy(queue_timeout_s=QUEUE_TIMEOUT_S)
    config = tiny_config(tmp_path_factory.mktemp("overload"), api_keys=list(KEYS.values()), failover=failover)
    overrides = {"engine.max_num_seqs": 2, "engine.kv_cache_memory_gb": 0.05, "admission.max_queue": MAX_QUEUE}
    with running_gateway(GRAPHS / "colocated.yaml", config, model=model, **overrides) as gw:
        yield gw


def _auth(who: str = "alice") -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[who]}"}


@contextmanager
def _long_streams(gateway, count: int) -> Iterator[None]:
    """`count` long streams, each read past its first token, held open until the block ends (then left)."""
    client = httpx.Client(base_url=gateway.url, headers=_auth(), timeout=REPLY_TIMEOUT_S)
    responses, lines = [], []
    try:
        for _ in range(count):
            response = client.send(client.build_request("POST", "/v1/completions", json=LONG), stream=True)
            assert response.status_code == 200
            responses.append(response)
            lines.append(response.iter_lines())  # kept: a dropped line iterator closes the response (a disconnect)
            next(lines[-1])
        yield
    finally:
        for response in responses:
            response.close()
        client.close()


def _raw_stream_request(gateway, body: dict[str, Any]) -> socket.socket:
    """A streamed completion sent over a bare socket (so the test decides when the client leaves)."""
    payload = httpx.Request("POST", gateway.url + "/v1/completions", json=body, headers=_auth()).read()
    host, port = gateway.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {KEYS['alice']}\r\ncontent-length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def _until(condition, within_s: float) -> float:
    """Seconds until `condition()` held; fails after `within_s`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < within_s, "the condition did not hold in time"
        time.sleep(0.01)
    return time.monotonic() - start


def _engine(gateway):
    (engine,) = gateway.core.nodes_of("engine").values()
    return engine


def test_streams_abandoned_in_the_queue_generate_nothing(gateway):
    engine = _engine(gateway)
    with _long_streams(gateway, 2):
        waiting = [_raw_stream_request(gateway, {**LONG, "max_tokens": 50}) for _ in range(4)]
        _until(lambda: gateway.core.in_flight == 6, within_s=10)  # 2 in the engine, 4 in the policy queue
        for sock in waiting:
            sock.close()
        _until(lambda: gateway.core.in_flight == 2, within_s=5)
        assert len(gateway.call(engine.in_flight)) == 2
    _until(lambda: not gateway.call(engine.in_flight) and gateway.core.in_flight == 0, within_s=5)
    assert (engine.stats.running, engine.stats.waiting) == (0, 0)  # what `sagellm:num_requests_*` read
    cancelled = [s for _, s in gateway.core.attempts.recent.values() if s["status"] == "cancelled"]
    assert len(cancelled) >= 4 and all(s["output_tokens"] == 0 for s in cancelled[-6:-2])


def _overloaded_count(gateway) -> float:
    text = httpx.get(gateway.url + "/metrics", headers=_auth()).text
    found = re.search(r'^sagellm:request_failure_total\{code="overloaded"\} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_refusals_come_at_once_while_the_bound_is_full(gateway):
    load = gateway.core.local.load
    with _long_streams(gateway, 2):
        held = [_raw_stream_request(gateway, LONG) for _ in range(MAX_QUEUE - 2)]
        try:
            _until(lambda: gateway.core.in_flight == MAX_QUEUE, within_s=10)
            refused_before, ended_before = _overloaded_count(gateway), load.completed + load.failed
            latencies: list[float] = []

            def extra() -> None:
                start = time.monotonic()
                reply = httpx.post(gateway.url + "/v1/completions", json={**LONG, "max_tokens": 2}, headers=_auth())
                latencies.append(time.monotonic() - start)
                assert reply.status_code == 429 and int(reply.headers["retry-after"]) >= 1

            threads = [threading.Thread(target=extra) for _ in range(20)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert len(latencies) == 20
            assert max(latencies) < 5  # the slots free only when the long streams end, far later
            assert gateway.core.in_flight == MAX_QUEUE
            assert load.completed + load.failed == ended_before  # refused at the door: none entered the graph
            assert _overloaded_count(gateway) == refused_before + 20  # yet each is in the metrics
        finally:
            for sock in held:
                sock.close()
    _until(lambda: gateway.core.in_flight == 0, within_s=10)


def test_a_request_of_many_prompts_is_refused_whole(gateway):
    load = gateway.core.local.load
    ended_before = load.completed + load.failed
    with _long_streams(gateway, 2):
        prompts = {"prompt": ["Hi"] * (MAX_QUEUE - 1), "max_tokens": 2}  # fits the bound, not the room left
        reply = httpx.post(gateway.url + "/v1/completions", json=prompts, headers=_auth(), timeout=REPLY_TIMEOUT_S)
        assert reply.status_code == 429 and reply.json()["error"]["code"] == "overloaded"
        huge = {"prompt": ["Hi"] * 2000, "max_tokens": 2}
        reply = httpx.post(gateway.url + "/v1/completions", json=huge, headers=_auth(), timeout=REPLY_TIMEOUT_S)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt"
        assert gateway.core.in_flight == 2 and load.completed + load.failed == ended_before  # no prompt entered
    fits = httpx.post(
        gateway.url + "/v1/completions", json={"prompt": ["Hi"] * 4, "max_tokens": 2}, headers=_auth(), timeout=60
    )
    assert fits.status_code == 200 and len(fits.json()["choices"]) == 4


def test_a_request_status_is_its_senders_alone(gateway):
    body = {"prompt": "Hi", "max_tokens": 2}
    reply = httpx.post(gateway.url + "/v1/completions", json=body, headers=_auth("alice"), timeout=REPLY_TIMEOUT_S)
    request_id = reply.json()["id"]
    assert len(request_id.split("-", 1)[1]) == 32  # 128 random bits: not guessable from another id
    mine = httpx.get(f"{gateway.url}/v1/requests/{request_id}", headers=_auth("alice"))
    assert mine.status_code == 200 and mine.json()["status"] == "completed"
    theirs = httpx.get(f"{gateway.url}/v1/requests/{request_id}", headers=_auth("bob"))
    assert theirs.status_code == 404


def test_a_request_queued_past_the_queue_timeout_ends_with_a_503(gateway):
    with _long_streams(gateway, 2):
        start = time.monotonic()
        reply = httpx.post(gateway.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=_auth(),
                           timeout=REPLY_TIMEOUT_S)  # fmt: skip
        waited = time.monotonic() - start
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "queue_timeout"
    assert "retry-after" in reply.headers and QUEUE_TIMEOUT_S <= waited < QUEUE_TIMEOUT_S + 10
