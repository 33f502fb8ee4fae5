"""Penalties, biases and token restrictions through the official `openai` SDK, against the default model served
colocated and through the PD graph: OpenAI's `presence_penalty`, `frequency_penalty` and `logit_bias` (string keys,
as the SDK sends them) and vLLM's `repetition_penalty`, `min_tokens`, `bad_words` and `allowed_token_ids` in
`extra_body` change what the model says, and a value out of range is a 400 naming its field."""

from __future__ import annotations

import httpx
import pytest

from tests.gateway.conftest import REPLY_TIMEOUT_S, assert_refused_chat, sdk_client

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(900)]
PROMPT = "The capital of France is"


def _complete(server, max_tokens: int = 16, **fields) -> str:
    reply = sdk_client(server).completions.create(
        model=server.core.model_name, prompt=PROMPT, max_tokens=max_tokens, temperature=0, **fields
    )
    return reply.choices[0].text


def _token(server, text: str) -> int:
    (token,) = server.core.tokenizer.encode(text, add_special_tokens=False)
    return token


def test_repetition_penalty_and_bad_words_change_a_greedy_reply(server) -> None:
    plain = _complete(server)
    assert " Paris" in plain  # what the 135M model says unconstrained
    assert _complete(server, extra_body={"repetition_penalty": 1.5}) != plain
    assert " Paris" not in _complete(server, extra_body={"bad_words": [" Paris"]})
    penalized = _complete(server, frequency_penalty=1.5, presence_penalty=1.0)
    assert penalized != plain


def test_logit_bias_with_string_keys_and_allowed_token_ids_choose_the_tokens(server) -> None:
    blue = _token(server, " blue")
    assert _complete(server, max_tokens=4, logit_bias={str(blue): 100}) == " blue" * 4
    assert _complete(server, max_tokens=3, extra_body={"allowed_token_ids": [blue]}) == " blue" * 3
    chat = sdk_client(server).chat.completions.create(
        model=server.core.model_name,
        messages=[{"role": "user", "content": "Say yes."}],
        max_tokens=12,
        temperature=0,
        extra_body={"min_tokens": 12},
    )
    assert chat.usage.completion_tokens == 12 and chat.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"presence_penalty": 3}, "presence_penalty", "in [-2, 2]"),
        ({"frequency_penalty": -2.5}, "frequency_penalty", "in [-2, 2]"),
        ({"repetition_penalty": 0}, "repetition_penalty", "> 0"),
        ({"min_tokens": 9}, "min_tokens", "<= max_tokens (4)"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
        ({"allowed_token_ids": []}, "allowed_token_ids", "non-empty"),
        ({"bad_words": [""]}, "bad_words", "not blank"),
    ],
)
def test_a_value_out_of_range_is_a_400_naming_its_field(server, body, param, words) -> None:
    assert_refused_chat(server, body, param, words)


def test_token_ids_beyond_the_vocabulary_are_a_400_naming_the_field(server) -> None:
    vocab = len(server.core.tokenizer)
    for body, field in (
        ({"logit_bias": {str(vocab + 10): 5}}, "logit_bias"),
        ({"allowed_token_ids": [vocab + 1]}, "allowed_token_ids"),
    ):
        reply = httpx.post(
            server.url + "/v1/completions",
            json={"prompt": PROMPT, "max_tokens": 2, **body},
            timeout=REPLY_TIMEOUT_S,
        )
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["message"].startswith(f"{field} must"), reply.text
