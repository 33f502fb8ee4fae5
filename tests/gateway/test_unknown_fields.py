"""A request field the server does not know is refused with a 400 naming it, never accepted and ignored: a
`temprature` that sampled at the default temperature, a `max_tokns` that let the reply run to the context, would
change what the client gets without a word. Every unknown field is named at once, each with the field it was
probably meant to be; the openai SDK's `extra_body` reaches the same check. OpenAI's own chat arguments that this
server does not implement are held to vLLM's fields' rule (`vllm_fields.OPENAI_CHAT`): taken at the values that ask
for nothing (`store=False`, any `metadata`, `service_tier="auto"`), a 400 naming them at any other."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai.types.chat.completion_create_params import CompletionCreateParamsBase

from sagellm.gateway.openai.chat_completion.protocol import ChatCompletionRequest
from sagellm.gateway.openai.generation.vllm_fields import ANY_VALUE, OPENAI_CHAT
from tests.gateway.conftest import REPLY_TIMEOUT_S, sdk_client

ROUTES = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"prompt": "hi"},
}


@pytest.mark.parametrize("path", list(ROUTES))
def test_a_misspelled_field_is_a_400_naming_it_and_the_field_meant(gateway, path: str) -> None:
    reply = httpx.post(gateway.url + path, json={**ROUTES[path], "max_tokns": 2}, timeout=REPLY_TIMEOUT_S)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "max_tokns" and error["type"] == "invalid_request_error"
    assert "`max_tokns` (did you mean `max_tokens`?)" in error["message"]


@pytest.mark.parametrize("path", list(ROUTES))
def test_every_unknown_field_is_named_at_once(gateway, path: str) -> None:
    body = {**ROUTES[path], "max_tokns": 2, "temprature": 0, "frobnicate": True}
    error = httpx.post(gateway.url + path, json=body, timeout=REPLY_TIMEOUT_S).json()["error"]
    message = error["message"]
    assert "`temprature` (did you mean `temperature`?)" in message and "`max_tokns`" in message
    assert "`frobnicate`:" in message  # named, with no guess: nothing is close to it


def test_the_openai_sdks_extra_body_is_checked_too(gateway) -> None:
    client = sdk_client(gateway)
    with pytest.raises(openai.BadRequestError, match="did you mean `temperature`"):
        client.chat.completions.create(
            model=gateway.core.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            extra_body={"temprature": 0},
        )  # fmt: skip
    fine = client.completions.create(model=gateway.core.model_name, prompt="hi", max_tokens=2, extra_body={"top_k": 5})
    assert fine.choices[0].text is not None  # a field the server knows (vLLM's) is served as before


# A value of each of OpenAI's chat arguments not served that asks for something, as the openai SDK takes it.
OPENAI_ASKING = {
    "store": True,
    "service_tier": "flex",
    "prompt_cache_retention": "24h",
    "prompt_cache_options": {"mode": "explicit"},
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "Paris is the capital of France."},
    "web_search_options": {"search_context_size": "low"},
    "verbosity": "low",
    "moderation": {"model": "omni-moderation-latest"},
    "functions": [{"name": "f", "parameters": {"type": "object"}}],
    "function_call": "auto",
}


def test_every_openai_sdk_chat_argument_is_a_field_of_the_body() -> None:
    """None is refused as unknown: each is served, or declared with the values that ask for nothing."""
    unknown = set(CompletionCreateParamsBase.__annotations__) - set(ChatCompletionRequest.__struct_fields__)
    assert unknown == set()
    takes_any = {name for name, (values, _) in OPENAI_CHAT.items() if ANY_VALUE in values}
    assert set(OPENAI_ASKING) == set(OPENAI_CHAT) - takes_any  # each one that can ask is tried below


def test_openai_arguments_that_ask_for_nothing_are_taken(gateway) -> None:
    reply = sdk_client(gateway).chat.completions.create(
        model=gateway.core.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
        store=False, metadata={"a": "b"}, service_tier="auto", user="u1", safety_identifier="hashed-user",
        prompt_cache_key="conversation-7", prompt_cache_retention="in_memory", modalities=["text"],
        verbosity="medium",
    )  # fmt: skip
    assert reply.choices[0].message.content is not None


@pytest.mark.parametrize(("name", "value"), list(OPENAI_ASKING.items()), ids=list(OPENAI_ASKING))
def test_openai_arguments_that_ask_for_something_are_a_400_naming_them(gateway, name: str, value) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        sdk_client(gateway).chat.completions.create(
            model=gateway.core.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=2, **{name: value}
        )
    assert refused.value.param == name and "unknown field" not in str(refused.value), refused.value
