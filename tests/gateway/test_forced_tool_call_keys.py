"""A forced tool call (`tool_choice` "required" or a named function) whose parameters' schema says nothing of further
keys takes none, as vLLM's default grammar reads such a schema: the call comes back parsed, holding declared keys
only, where a small model otherwise added keys of its own until `max_tokens` cut the call and the reply came back as
`<tool_call>` text (smolagents' tools never ran). The request is smolagents' ToolCallingAgent's shape, sent by the
openai SDK to the tiny model at temperature 1 (so the model would take any key the grammar left open). A schema that
allows more keys, or a map that declares none, keeps them allowed."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from sagellm.gateway.replies.tools import Tool, call_grammar
from tests.gateway.conftest import GRAPHS, running_gateway, sdk_client, tiny_config
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow

# smolagents' tool schema: each input's type and description, the required ones listed, nothing about other keys
# (bounded strings so that every call the grammar allows ends well before max_tokens)
LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup_weather",
        "description": "Looks up the weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "the city", "maxLength": 12},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "the unit"},
                "when": {"type": "object", "properties": {"days_ahead": {"type": "integer", "minimum": 0,
                                                                         "maximum": 6}}},
            },
            "required": ["city"],
        },
    },
}  # fmt: skip
DECLARED = {"city", "unit", "when"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """The tiny model with room for the tools' prompt (the fallback template shows them as JSON)."""
    model = make_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama", max_position_embeddings=2048)
    with running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path_factory.mktemp("keys")), model) as gw:
        yield gw


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "lookup_weather"}}])
def test_a_forced_call_holds_only_the_declared_keys(gateway, choice: Any) -> None:
    client = sdk_client(gateway)
    messages = [{"role": "system", "content": "You can call tools."}, {"role": "user", "content": "Weather in Rome?"}]
    for seed in range(4):
        reply = client.chat.completions.create(
            model=gateway.core.model_name, messages=messages, tools=[LOOKUP], tool_choice=choice,
            parallel_tool_calls=False, max_tokens=300, temperature=1.0, seed=seed,
        )  # fmt: skip
        answer = reply.choices[0]
        assert answer.finish_reason == "tool_calls" and not answer.message.content, answer
        (call,) = answer.message.tool_calls
        arguments = json.loads(call.function.arguments)
        assert call.function.name == "lookup_weather" and "city" in arguments and set(arguments) <= DECLARED
        assert set(arguments.get("when", {})) <= {"days_ahead"}


def test_a_schema_that_allows_more_keys_keeps_them() -> None:
    parameters = {
        "type": "object",
        "properties": {
            "tags": {"type": "object"},  # a free-form map: closed, it could only be {}
            "extra": {"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "string"}},
            "items": {"type": "array", "items": {"type": "object", "properties": {"b": {}}}},
        },
    }
    tool = msgspec.convert({"type": "function", "function": {"name": "f", "parameters": parameters}}, Tool)
    grammar = call_grammar([tool], "hermes", parallel=False)
    call = json.loads(grammar.split("%json ", 1)[1].rsplit(' "\\n</tool_call>"', 1)[0])
    arguments = call["anyOf"][0]["properties"]["arguments"]
    assert arguments["additionalProperties"] is False
    assert "additionalProperties" not in arguments["properties"]["tags"]
    assert arguments["properties"]["extra"]["additionalProperties"] == {"type": "string"}
    assert arguments["properties"]["items"]["items"]["additionalProperties"] is False
