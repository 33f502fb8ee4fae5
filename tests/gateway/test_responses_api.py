"""The Responses API through the official `openai` SDK, unchanged, against SmolLM2 served colocated and through the
PD graph: `responses.create` whole and streamed (the typed events in order, their text the response's), with a
function tool whose call's arguments follow its parameters and a follow-up that answers the call through
`previous_response_id`, with `text.format` a JSON schema; and what it cannot do refused by name."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.gateway.conftest import sdk_client

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(900)]

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def test_a_response_whole_and_streamed_says_the_same(server) -> None:
    sdk = sdk_client(server)
    asked = dict(model=server.core.model_name, input="What is the capital of France?", instructions="Be brief.",
                 max_output_tokens=24, temperature=0)  # fmt: skip
    whole = sdk.responses.create(**asked)
    assert whole.status in ("completed", "incomplete") and whole.output_text
    assert whole.usage.input_tokens > 0 and 0 < whole.usage.output_tokens <= 24
    events = list(sdk.responses.create(**asked, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    streamed = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert streamed == events[-1].response.output_text == whole.output_text


def test_a_function_call_and_its_answer_through_previous_response_id(server) -> None:
    sdk = sdk_client(server)
    first = sdk.responses.create(model=server.core.model_name, input="What is the weather in Paris?", tools=[WEATHER],
                                 tool_choice="required", temperature=0, max_output_tokens=100)  # fmt: skip
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    answer = {"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 21}'}
    second = sdk.responses.create(model=server.core.model_name, previous_response_id=first.id, input=[answer],
                                  tools=[WEATHER], temperature=0, max_output_tokens=30)  # fmt: skip
    assert second.previous_response_id == first.id and second.output
    streamed = list(sdk.responses.create(model=server.core.model_name, input="Weather in Oslo?", tools=[WEATHER],
                                         tool_choice="required", stream=True, max_output_tokens=100))  # fmt: skip
    arguments = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert len(arguments) == 1 and "city" in json.loads(arguments[0].arguments)


def test_text_format_json_schema_constrains_the_output(server) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20}},
              "required": ["city", "country"], "additionalProperties": False}  # fmt: skip
    reply = sdk_client(server).responses.create(
        model=server.core.model_name,
        input="Name a city.",
        text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}},
        temperature=0,
        max_output_tokens=60,
    )
    jsonschema.validate(json.loads(reply.output_text), schema)


def test_what_it_cannot_do_is_refused_by_name(server) -> None:
    if server.graph != "colocated":
        pytest.skip("the front end's check is the same on every graph")
    sdk = sdk_client(server)
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.responses.create(model=server.core.model_name, input="hi", previous_response_id="resp_nope")
    assert missing.value.body["param"] == "previous_response_id"
    for body, param in [
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"input": [{"type": "image_generation_call"}]}, "input[0]"),
    ]:
        reply = httpx.post(server.url + "/v1/responses", json={"input": "hi", **body}, timeout=60)
        assert reply.status_code == 400 and param in (reply.json()["error"]["param"] or ""), reply.text
