"""A request for an attached OpenAI-compatible server carries its penalties, biases and token restrictions in the
fields OpenAI and vLLM read, and only those that change something."""

from __future__ import annotations

from sagellm.operators.openai_wire import openai_call
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.pipeline.messages import Request


def test_penalties_biases_and_restrictions_go_to_the_server() -> None:
    sampling = SamplingParams(
        presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.2, logit_bias={"50": 3, 7: -200},
        min_tokens=2, bad_words=[" Paris"], allowed_token_ids=[7, 50],
    )  # fmt: skip
    body = openai_call(Request(request_id="p", prompt="x", sampling=sampling), "m")[1]
    assert {k: body[k] for k in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens")} == {
        "presence_penalty": 0.5, "frequency_penalty": -1.0, "repetition_penalty": 1.2, "min_tokens": 2}  # fmt: skip
    assert body["logit_bias"] == {"50": 3.0, "7": -100.0}  # JSON's string keys, clamped as OpenAI's
    assert body["bad_words"] == [" Paris"] and body["allowed_token_ids"] == [7, 50]
    plain = openai_call(Request(request_id="q", prompt="x"), "m")[1]
    unsent = ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens", "bad_words")
    assert not set(plain) & {*unsent, "allowed_token_ids"}
