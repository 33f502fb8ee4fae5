"""`n` and `best_of` through the official `openai` SDK against the default model, colocated and through the PD
graph: greedy choices all equal the single reply; seeded sampled choices are reproducible, and the same on both
graphs; a streamed request's chunks carry their choice's index; best_of answers with its n best by cumulative
logprob; what cannot be served is a 400 naming its field."""

from __future__ import annotations

import httpx
import pytest

from tests.gateway.conftest import REPLY_TIMEOUT_S, sdk_client

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(900)]
PROMPT = "Once upon a time"
SAMPLED: dict[str, list[str]] = {}  # graph -> the seeded choices it gave


def _choices(server, **fields) -> list[str]:
    reply = sdk_client(server).completions.create(model=server.core.model_name, prompt=PROMPT, **fields)
    assert [c.index for c in reply.choices] == list(range(len(reply.choices)))
    return [c.text for c in reply.choices]


def test_greedy_choices_equal_the_single_reply(server) -> None:
    (single,) = _choices(server, max_tokens=12, temperature=0)
    assert _choices(server, max_tokens=12, temperature=0, n=4, seed=1) == [single] * 4
    chat = sdk_client(server).chat.completions.create(
        model=server.core.model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0, n=3
    )
    assert len({c.message.content for c in chat.choices}) == 1 and [c.index for c in chat.choices] == [0, 1, 2]


def test_seeded_choices_are_reproducible_and_the_same_on_every_graph(server) -> None:
    sampled = _choices(server, max_tokens=16, temperature=1.0, n=4, seed=42)
    assert sampled == _choices(server, max_tokens=16, temperature=1.0, n=4, seed=42)
    assert len(set(sampled)) > 1
    assert _choices(server, max_tokens=16, temperature=1.0, seed=44) == [sampled[2]]  # choice 2 is seed + 2
    SAMPLED[server.graph] = sampled
    if len(SAMPLED) == 2:
        assert SAMPLED["colocated"] == SAMPLED["pd"]


def test_streamed_choices_carry_their_index(server) -> None:
    expected = _choices(server, max_tokens=12, temperature=1.0, n=3, seed=7)
    texts = ["", "", ""]
    ends = [None, None, None]
    stream = sdk_client(server).completions.create(
        model=server.core.model_name, prompt=PROMPT, max_tokens=12, temperature=1.0, n=3, seed=7, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            ends[choice.index] = choice.finish_reason or ends[choice.index]
        usage = chunk.usage or usage
    assert texts == expected and ends == ["length"] * 3
    assert usage.completion_tokens == 36 and usage.prompt_tokens == len(server.core.tokenizer.encode(PROMPT))


def test_best_of_answers_with_the_most_likely_choices(server) -> None:
    every = sdk_client(server).completions.create(
        model=server.core.model_name, prompt=PROMPT, max_tokens=8, temperature=1.0, n=4, seed=9, logprobs=0
    )
    totals = [sum(c.logprobs.token_logprobs) for c in every.choices]
    best = sorted(range(4), key=lambda i: totals[i], reverse=True)[:2]
    reply = sdk_client(server).completions.create(
        model=server.core.model_name, prompt=PROMPT, max_tokens=8, temperature=1.0, n=2, best_of=4, seed=9
    )
    assert [c.text for c in reply.choices] == [every.choices[i].text for i in sorted(best)]
    assert all(c.logprobs is None for c in reply.choices)
    assert reply.usage.completion_tokens == every.usage.completion_tokens  # every run is billed


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 17}, "n"),
        ({"n": 0}, "n"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"best_of": 3, "stream": True}, "best_of"),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_its_field(server, body, param) -> None:
    if server.graph != "colocated":
        pytest.skip("the front end's check is the same on every graph")
    reply = httpx.post(
        server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, **body}, timeout=REPLY_TIMEOUT_S
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param, reply.text
