"""Anthropic's structured output on `/v1/messages`: `output_config.format`, a JSON schema, makes the reply's text an
instance of it by guided decoding (the chat's `response_format`), whole and streamed. Sent as its clients send it:
the anthropic SDK's `messages.parse` with a pydantic model (pydantic-ai's native output sends the same field), and
the raw request; the tiny random model writes no JSON of its own, so every parse shows the constraint held. A
format of another shape is a 400 naming the field, in Anthropic's error shape."""

from __future__ import annotations

import json
from typing import Literal

import anthropic
import httpx
import jsonschema
import pytest
from pydantic import BaseModel

from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "Is Paris in France? Answer as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "certainty": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["answer", "certainty"],
    "additionalProperties": False,
}


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    sure: bool


@pytest.fixture(scope="module")
def gateway(tiny_model, tmp_path_factory):
    with running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path_factory.mktemp("out")), tiny_model) as gw:
        yield gw


def test_messages_parse_returns_the_model_it_asked_for(gateway) -> None:
    client = anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=REPLY_TIMEOUT_S)
    for temperature in (0.0, 1.0):
        reply = client.messages.parse(
            model=gateway.core.model_name, max_tokens=64, messages=ASK, output_format=Verdict,
            extra_body={"temperature": temperature},
        )  # fmt: skip
        assert reply.stop_reason == "end_turn" and isinstance(reply.parsed_output, Verdict), reply


@pytest.mark.parametrize("stream", [False, True])
def test_the_raw_field_constrains_the_text(gateway, stream: bool) -> None:
    body = {
        "model": gateway.core.model_name, "max_tokens": 64, "messages": ASK, "temperature": 1.0, "stream": stream,
        "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}, "effort": "low"},
    }  # fmt: skip
    with httpx.stream("POST", gateway.url + "/v1/messages", json=body, timeout=REPLY_TIMEOUT_S) as reply:
        assert reply.status_code == 200, reply.read()
        if stream:
            events = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: ")]
            text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
        else:
            text = json.loads(reply.read())["content"][0]["text"]
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize(
    "form", [{"type": "json_object"}, {"type": "json_schema"}, {"type": "json_schema", "schema": "object"}, "json"]
)
def test_a_format_of_another_shape_is_named(gateway, form: object) -> None:
    body = {"model": gateway.core.model_name, "max_tokens": 8, "messages": ASK, "output_config": {"format": form}}
    reply = httpx.post(gateway.url + "/v1/messages", json=body, timeout=REPLY_TIMEOUT_S)
    assert reply.status_code == 400, reply.text
    error = reply.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith("output_config.format: ")
