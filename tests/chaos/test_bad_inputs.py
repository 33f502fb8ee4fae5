"""The hand-made bad inputs of the chaos report (`sagellm.benchmarks.chaos_cases`), each once a dead gateway, a
failed batch or a 500, sent to a pd.yaml gateway (process-placed engines: the wire is on the path) while innocent
streams run: each gets its own 4xx, the streams all finish, the gateway stays ok."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from sagellm.benchmarks.chaos_cases import BAD_INPUTS, BadInput
from tests.chaos.test_worker_faults import stream
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow  # worker processes


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    model = make_tiny_llama(tmp_path_factory.mktemp("bad") / "llama", max_position_embeddings=4096)
    with running_gateway(GRAPHS / "pd.yaml", tiny_config(tmp_path_factory.mktemp("state")), model=model) as gw:
        yield gw


def send(url: str, case: BadInput) -> httpx.Response:
    return httpx.request(
        case.method, url + case.path, json=case.json, content=case.content, headers=case.headers,
        timeout=REPLY_TIMEOUT_S,
    )  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case.name for case in BAD_INPUTS])
def test_each_bad_input_gets_its_own_error(gateway, case):
    reply = send(gateway.url, case)
    assert reply.status_code == case.status, reply.text
    assert reply.json()["error"]["message"]


def test_bad_inputs_hurt_no_stream_running_beside_them(gateway):
    outcomes: dict[int, list[str]] = {}
    started = threading.Event()
    threads = [threading.Thread(target=stream, args=(gateway.url, i, outcomes, started)) for i in range(8)]
    for thread in threads:
        thread.start()
    assert started.wait(REPLY_TIMEOUT_S)
    statuses = [send(gateway.url, case).status_code for case in BAD_INPUTS * 2]
    for thread in threads:
        thread.join(REPLY_TIMEOUT_S)
    assert statuses == [case.status for case in BAD_INPUTS * 2]
    assert outcomes == {i: ["length"] for i in range(8)}
    assert httpx.get(gateway.url + "/health").json()["status"] == "ok"


def test_big_prompts_never_stall_health_or_the_streams_beside_them(gateway):
    """One 8 MB prompt tokenized on the gateway's event loop would freeze it for seconds: it is refused for its length
    before any tokenizing, and /health and a stream beside three of them answer as usual. A generous bound (the
    benchmark measures the milliseconds): it catches a stall, not a slow machine."""
    big = {"prompt": "word " * 1_600_000, "max_tokens": 4}  # 8 MB
    replies: list[httpx.Response] = []
    waits: list[float] = []
    outcomes: dict[int, list[str]] = {}
    started = threading.Event()
    streaming = threading.Thread(target=stream, args=(gateway.url, 0, outcomes, started))
    streaming.start()
    assert started.wait(REPLY_TIMEOUT_S)
    senders = [
        threading.Thread(
            target=lambda: replies.append(
                httpx.post(gateway.url + "/v1/completions", json=big, timeout=REPLY_TIMEOUT_S)
            )
        )  # fmt: skip
        for _ in range(3)
    ]
    for sender in senders:
        sender.start()
    while any(sender.is_alive() for sender in senders):
        sent = time.monotonic()
        assert httpx.get(gateway.url + "/health", timeout=REPLY_TIMEOUT_S).status_code == 200
        waits.append(time.monotonic() - sent)
        time.sleep(0.01)
    streaming.join(REPLY_TIMEOUT_S)
    assert [r.status_code for r in replies] == [400] * 3
    assert {r.json()["error"]["code"] for r in replies} == {"context_length_exceeded"}
    assert max(waits, default=0) < 2.0, waits
    assert outcomes == {0: ["length"]}
