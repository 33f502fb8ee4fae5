"""The hand-made bad inputs of the chaos report (`sagellm.benchmarks.chaos_cases`), each once a dead gateway, a
failed batch or a 500, sent to a pd.yaml gateway (process-placed engines: the wire is on the path) while innocent
streams run: each gets its own 4xx, the streams all finish, the gateway stays ok."""

from __future__ import annotations

import threading

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
