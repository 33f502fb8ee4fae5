"""`sagellm serve --api-servers 2`: two API server processes share the port in front of the core that runs the graph
(a tiny Llama behind graphs/colocated.yaml). Replies equal the offline API's whichever API server takes them, errors
keep their statuses, a client that leaves cancels its request in the core, the metrics count the requests of both,
and an API server that dies is started again while the other serves on."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest

from sagellm import LLM, SamplingParams
from tests.gateway.conftest import (
    GRAPHS,
    REPLY_TIMEOUT_S,
    leave_a_stream_and_see_it_cancelled,
    running_gateway,
    tiny_config,
)

pytestmark = pytest.mark.slow
KEY = "sk-test"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gateway(tiny_model, tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("gw"), api_keys=[KEY], max_body_bytes=64 * 1024)
    with running_gateway(GRAPHS / "colocated.yaml", config, model=tiny_model, api_servers=2) as gw:
        yield gw


@pytest.fixture(scope="module")
def offline(tiny_model) -> LLM:
    return LLM(str(tiny_model))


def auth() -> dict[str, str]:
    return {"authorization": f"Bearer {KEY}"}


def fresh_client(gateway) -> openai.OpenAI:
    """A client on new connections: the kernel spreads new connections over the API servers."""
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0, http_client=httpx.Client())


def success_total(gateway) -> float:
    text = httpx.get(gateway.url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("sagellm:request_success_total{")
    )


def test_replies_equal_the_offline_api_through_both_api_servers_and_metrics_count_them_all(gateway, offline):
    hub = gateway.gateway.hub
    assert hub is not None and len(hub.serving) == 2
    expected = offline.chat(CHAT, SamplingParams(max_tokens=12, temperature=0))[0].outputs[0]
    before, counted = success_total(gateway), dict(hub.submitted)
    for _ in range(12):
        client = fresh_client(gateway)
        plain = client.chat.completions.create(
            model=gateway.core.model_name, messages=CHAT, max_tokens=12, temperature=0
        )
        assert plain.choices[0].message.content == expected.text
        chunks = client.chat.completions.create(
            model=gateway.core.model_name, messages=CHAT, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert "".join(pieces) == expected.text
        client.close()
    served = {pid: n - counted.get(pid, 0) for pid, n in hub.submitted.items()}
    assert sum(served.values()) == 24 and len([n for n in served.values() if n]) == 2, served  # both took requests
    assert success_total(gateway) == before + 24  # /metrics (passed on to the core) counts both API servers'


def test_errors_keep_their_statuses_and_shapes(gateway):
    url = gateway.url + "/v1/chat/completions"
    cases = [
        ({}, {"model": "x", "messages": CHAT}, 401),  # no key: the API server's own check
        (auth(), b"{not json", 400),
        (auth(), {"model": "no-such-model", "messages": CHAT}, 404),
        (auth(), {"messages": CHAT, "max_tokens": -1}, 400),
        (auth(), {"messages": [{"role": "user", "content": "word " * 5000}], "max_tokens": 4}, 400),  # the core's
    ]
    for headers, body, status in cases:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        reply = httpx.post(url, headers=headers, timeout=REPLY_TIMEOUT_S, **kwargs)
        assert reply.status_code == status, (body if isinstance(body, bytes) else str(body)[:80], reply.text)
        assert reply.json()["error"]["message"]
    too_many = {"prompt": ["Hi"] * 1025, "max_tokens": 2}  # more prompts than the core's bound: refused whole
    reply = httpx.post(gateway.url + "/v1/completions", json=too_many, headers=auth(), timeout=REPLY_TIMEOUT_S)
    assert reply.status_code == 400 and "1025 prompts" in reply.json()["error"]["message"]
    three = httpx.post(gateway.url + "/v1/completions", json={"prompt": ["Hi"] * 3, "max_tokens": 2}, headers=auth())
    assert three.status_code == 200 and len(three.json()["choices"]) == 3
    assert httpx.get(gateway.url + "/v1/nowhere", headers=auth()).status_code == 404  # passed on, the core's 404
    assert httpx.get(gateway.url + "/v1/models", headers=auth()).json()["data"][0]["id"] == gateway.core.model_name
    assert httpx.get(gateway.url + "/health").status_code == 200


def test_responses_are_answered_by_the_core_and_continue_on_any_api_server(gateway):
    """The core keeps every stored response, so a follow-up on new connections (another API server, likely) finds
    its previous one; a streamed response comes whole, its events all there."""
    model = gateway.core.model_name
    first = fresh_client(gateway).responses.create(model=model, input="Hi!", max_output_tokens=4, temperature=0)
    for _ in range(4):
        client = fresh_client(gateway)
        later = client.responses.create(model=model, input="And?", previous_response_id=first.id, max_output_tokens=4)
        assert later.previous_response_id == first.id
        events = list(client.responses.create(model=model, input="Hi!", max_output_tokens=4, stream=True))
        assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
        client.close()


def test_a_client_that_leaves_cancels_its_request_in_the_core(gateway):
    leave_a_stream_and_see_it_cancelled(gateway, auth())


def test_an_api_server_that_dies_is_started_again_and_the_other_serves_meanwhile(gateway, offline):
    hub = gateway.gateway.hub
    expected = offline.chat(CHAT, SamplingParams(max_tokens=6, temperature=0))[0].outputs[0]
    victim = next(pid for peer, pid in hub.pids.items() if peer in hub.serving)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        client = fresh_client(gateway)
        try:
            reply = client.chat.completions.create(
                model=gateway.core.model_name, messages=CHAT, max_tokens=6, temperature=0
            )
            assert reply.choices[0].message.content == expected.text
        except openai.APIConnectionError:
            pass  # a connection the kernel gave the dead one before it was gone
        finally:
            client.close()
        pids = [pid for peer, pid in hub.pids.items() if peer in hub.serving]
        if len(pids) == 2 and victim not in pids:
            break
        time.sleep(0.2)
    pids = [pid for peer, pid in hub.pids.items() if peer in hub.serving]
    assert len(pids) == 2 and victim not in pids
