"""Speculative decoding through the server: the colocated and the PD graph (its decode worker speculating) answer a
repetitive prompt, streamed and not, with the very tokens a server without speculation gives, and /metrics counts
the proposals (vLLM's metric names, `sagellm:` prefixed)."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.engine.test_speculative import NGRAM
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, sdk_client, tiny_config

PROMPT = [11, 12, 13, 14, 15, 16] * 4  # token ids: the tiny tokenizer's words would not repeat as reliably
GREEDY = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def plain_tokens(tiny_model, tmp_path_factory) -> list[int]:
    with running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path_factory.mktemp("plain")), tiny_model) as gw:
        return _completion_tokens(gw)


@pytest.fixture(scope="module", params=[("colocated", "engine"), ("pd", "decode")], ids=["colocated", "pd"])
def speculating(request, tiny_model, tmp_path_factory):
    graph, node = request.param
    config = tiny_config(tmp_path_factory.mktemp(graph))
    with running_gateway(GRAPHS / f"{graph}.yaml", config, tiny_model, **{f"{node}.speculative_config": NGRAM}) as gw:
        yield gw


def test_the_tokens_are_those_of_a_server_without_speculation(speculating, plain_tokens):
    assert _completion_tokens(speculating) == plain_tokens
    streamed = sdk_client(speculating).completions.create(
        model=speculating.core.model_name, prompt=PROMPT, stream=True, logprobs=1, **_sdk(GREEDY)
    )
    chunks = [c for c in streamed if c.choices and c.choices[0].logprobs]
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks) == GREEDY["max_tokens"]


def test_metrics_count_the_proposals_and_their_acceptance(speculating, plain_tokens):
    _completion_tokens(speculating)
    deadline = time.monotonic() + 30  # a worker process's counts come with its heartbeats, every 0.5 s
    while (values := _spec_metrics(speculating))["sagellm:spec_decode_num_accepted_tokens_total"] == 0:
        assert time.monotonic() < deadline, values
        time.sleep(0.2)
    assert (
        values["sagellm:spec_decode_num_draft_tokens_total"] >= values["sagellm:spec_decode_num_accepted_tokens_total"]
    )
    assert 0 < values["sagellm:spec_decode_acceptance_rate"] <= 1


def _spec_metrics(gateway) -> dict[str, float]:
    """The spec_decode lines of /metrics, summed over the engines (a PD graph's prefill worker never speculates)."""
    values: dict[str, float] = {}
    for line in httpx.get(gateway.url + "/metrics", timeout=REPLY_TIMEOUT_S).text.splitlines():
        if line.startswith("sagellm:spec_decode") and 'engine="' in line:
            name = line.split("{")[0]
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def _completion_tokens(gateway) -> list[int]:
    reply = httpx.post(
        gateway.url + "/v1/completions",
        json={"prompt": PROMPT, "logprobs": 0, **GREEDY},
        timeout=REPLY_TIMEOUT_S,
    )
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    return choice["logprobs"]["tokens"]


def _sdk(params: dict) -> dict:
    """The request's fields as the SDK takes them: its own arguments, and vLLM's extras in extra_body."""
    return {"max_tokens": params["max_tokens"], "temperature": 0, "extra_body": {"ignore_eos": True}}
