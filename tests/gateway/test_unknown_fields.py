"""A request field the server does not know is refused with a 400 naming it, never accepted and ignored: a
`temprature` that sampled at the default temperature, a `max_tokns` that let the reply run to the context, would
change what the client gets without a word. Every unknown field is named at once, each with the field it was
probably meant to be; the openai SDK's `extra_body` reaches the same check."""

from __future__ import annotations

import httpx
import openai
import pytest

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
