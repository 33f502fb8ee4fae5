"""Tool calling through the official `openai` SDK, unchanged, against SmolLM2 served colocated and through the PD
graph: its chat template shows no tools, so the ChatML fallback template does, and the Hermes parser reads the
calls back. With `tool_choice` "required" or a named function the reply is constrained to a call, so its arguments
follow the function's parameters on twenty tools, whatever the 135M model would have said; calls stream as
`delta.tool_calls` with `finish_reason: "tool_calls"`; the Python client returns calls (`chat_message`) and
structured replies; a gateway that attached this server as an `openai` engine passes it the tools and reads its
calls back; a history holding calls and their results is answered; and a `tool_choice` that cannot be honoured is a
400 naming it."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import pytest

from sagellm.client import ClientError, UnifiedInferenceClient
from tests.gateway.conftest import (
    GRAPHS,
    LOCAL_UPSTREAMS,
    assert_refused_chat,
    running_gateway,
    sdk_client,
    tiny_config,
)
from tests.gateway.test_management import ENGINES, wait_for

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(900)]


def function(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    parameters = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


TEXT = {"type": "string", "maxLength": 30}
TOOLS = [
    (function("get_weather", "Current weather in a city", {"city": TEXT}, ["city"]), "Weather in Paris?"),
    (function("add", "Add two numbers", {"a": {"type": "number"}, "b": {"type": "number"}}, ["a", "b"]), "2 + 3?"),
    (function("send_email", "Send an email", {"to": TEXT, "subject": TEXT, "body": TEXT}, ["to", "subject"]),
     "Email bob about lunch."),
    (function("set_alarm", "Set an alarm", {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                            "minute": {"type": "integer", "minimum": 0, "maximum": 59}},
              ["hour", "minute"]), "Wake me at 7:30."),
    (function("search", "Search the web", {"query": TEXT, "limit": {"type": "integer", "minimum": 1, "maximum": 10}},
              ["query"]), "Find pancake recipes."),
    (function("convert", "Convert units", {"value": {"type": "number"}, "unit": {"enum": ["km", "mi", "m"]}},
              ["value", "unit"]), "5 miles in km?"),
    (function("book_table", "Book a restaurant", {"people": {"type": "integer", "minimum": 1, "maximum": 20},
                                                   "time": TEXT}, ["people", "time"]), "Table for 4 at 8pm."),
    (function("translate", "Translate text", {"text": TEXT, "to": {"enum": ["fr", "de", "es"]}}, ["text", "to"]),
     "Say hello in French."),
    (function("play_song", "Play music", {"title": TEXT, "shuffle": {"type": "boolean"}}, ["title"]),
     "Play Yesterday."),
    (function("create_event", "Add to calendar", {"title": TEXT, "day": {"type": "integer", "minimum": 1,
                                                                           "maximum": 31}}, ["title", "day"]),
     "Dentist on the 12th."),
    (function("stock_price", "Price of a stock", {"ticker": {"type": "string", "pattern": "^[A-Z]{1,5}$"}},
              ["ticker"]), "Apple's stock price?"),
    (function("set_light", "Dim the lights", {"room": TEXT, "level": {"type": "number", "minimum": 0,
                                                                        "maximum": 1}}, ["room", "level"]),
     "Dim the kitchen to half."),
    (function("order_pizza", "Order a pizza", {"size": {"enum": ["s", "m", "l"]}, "toppings": {
        "type": "array", "items": TEXT, "maxItems": 3}}, ["size", "toppings"]), "A large pepperoni pizza."),
    (function("get_time", "Time in a time zone", {"zone": TEXT}, ["zone"]), "Time in Tokyo?"),
    (function("reminder", "Remind me", {"what": TEXT, "minutes": {"type": "integer", "minimum": 1,
                                                                  "maximum": 1440}}, ["what", "minutes"]),
     "Remind me to call mom in 10 minutes."),
    (function("rate_movie", "Rate a film", {"title": TEXT, "stars": {"type": "integer", "minimum": 1,
                                                                     "maximum": 5}}, ["title", "stars"]),
     "Give Inception five stars."),
    (function("route", "Directions", {"from": TEXT, "to": TEXT, "mode": {"enum": ["car", "walk", "bike"]}},
              ["from", "to", "mode"]), "Walk from home to school."),
    (function("tip", "Compute a tip", {"bill": {"type": "number", "minimum": 0}, "percent": {"type": "number"}},
              ["bill", "percent"]), "15% tip on $40."),
    (function("lookup_word", "Define a word", {"word": TEXT}, ["word"]), "What does 'serene' mean?"),
    (function("timer", "Start a timer", {"seconds": {"type": "integer", "minimum": 1, "maximum": 86400}},
              ["seconds"]), "A 3 minute timer."),
]  # fmt: skip


def call(server, tool: dict[str, Any], prompt: str, tool_choice: Any, **extra: Any) -> Any:
    return sdk_client(server).chat.completions.create(
        model=server.core.model_name,
        messages=[{"role": "user", "content": prompt}],
        tools=[tool, TOOLS[0][0]] if tool is not TOOLS[0][0] else [tool],
        tool_choice=tool_choice,
        temperature=0,
        max_tokens=200,
        **extra,
    )


def test_required_and_named_tool_calls_follow_the_parameters_of_twenty_tools(server) -> None:
    def ask(case: tuple[int, str]) -> tuple[dict, Any]:
        index, mode = case
        tool, prompt = TOOLS[index]
        name = tool["function"]["name"]
        choice = "required" if mode == "required" else {"type": "function", "function": {"name": name}}
        return tool, call(server, tool, prompt, choice, parallel_tool_calls=False).choices[0]

    cases = [(i, mode) for i in range(len(TOOLS)) for mode in ("required", "named")]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, cases))
    for (tool, choice), (_, mode) in zip(replies, cases):
        assert choice.finish_reason == "tool_calls", (tool["function"]["name"], choice)
        (tool_call,) = choice.message.tool_calls
        assert tool_call.id.startswith("call_") and tool_call.type == "function"
        chosen = {t["function"]["name"]: t for t in (tool, TOOLS[0][0])}[tool_call.function.name]
        if mode == "named":
            assert chosen is tool
        jsonschema.validate(json.loads(tool_call.function.arguments), chosen["function"]["parameters"])


def test_a_streamed_call_comes_whole_in_delta_tool_calls(server) -> None:
    tool, prompt = TOOLS[0]
    chunks = list(call(server, tool, prompt, "required", stream=True))
    calls = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or []) if chunk.choices]
    (streamed,) = calls
    assert streamed.index == 0 and streamed.id.startswith("call_") and streamed.function.name == "get_weather"
    assert "city" in json.loads(streamed.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(chunk.choices[0].delta.content for chunk in chunks if chunk.choices)


def test_the_python_client_returns_calls_and_structured_replies(server) -> None:
    tool, prompt = TOOLS[1]
    with UnifiedInferenceClient(server.url) as client:
        message = client.chat_message(prompt, tools=[tool], tool_choice="required", temperature=0, max_tokens=200)
        (called,) = message["tool_calls"]
        assert called["function"]["name"] == "add"
        jsonschema.validate(json.loads(called["function"]["arguments"]), tool["function"]["parameters"])
        with pytest.raises(ClientError, match=r"tool calls \(add\).*chat_message"):
            client.chat(prompt, tools=[tool], tool_choice="required", temperature=0, max_tokens=200)
        schema = {"type": "object", "properties": {"sum": {"type": "integer"}}, "required": ["sum"]}
        text = client.chat(
            prompt,
            temperature=0,
            max_tokens=40,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        )
        jsonschema.validate(json.loads(text), schema)


def test_an_attached_servers_model_gets_the_tools_and_its_calls_come_back(server, tiny_model, tmp_path) -> None:
    """The management API's `openai` engine: a gateway on another model attaches this server, and passes a chat's
    tools and tool_choice to it; its calls come back as calls, whole and streamed."""
    config = tiny_config(tmp_path, allowed_upstreams=LOCAL_UPSTREAMS)
    with running_gateway(GRAPHS / "colocated.yaml", config, tiny_model) as front:
        admin = {"authorization": f"Bearer {front.gateway.admin_key}"}
        body = {"kind": "openai", "model": server.core.model_name, "url": server.url + "/v1",
                "served_model_name": "upstream"}  # fmt: skip
        created = httpx.post(front.url + ENGINES, json=body, headers=admin, timeout=60)
        assert created.status_code == 201, created.text
        wait_for(httpx.Client(base_url=front.url, headers=admin, timeout=60), created.json()["id"], {"ready"})
        tool, prompt = TOOLS[2]
        ask = {"model": "upstream", "messages": [{"role": "user", "content": prompt}], "tools": [tool],
               "tool_choice": {"type": "function", "function": {"name": "send_email"}}, "temperature": 0,
               "max_tokens": 200}  # fmt: skip
        choice = sdk_client(front).chat.completions.create(**ask).choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (called,) = choice.message.tool_calls
        assert called.function.name == "send_email" and called.id.startswith("call_")
        jsonschema.validate(json.loads(called.function.arguments), tool["function"]["parameters"])
        chunks = list(sdk_client(front).chat.completions.create(**ask, stream=True))
        (streamed,) = [c for chunk in chunks if chunk.choices for c in chunk.choices[0].delta.tool_calls or []]
        assert (streamed.function.name, streamed.function.arguments) == ("send_email", called.function.arguments)
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_history_with_calls_and_results_is_answered_and_auto_may_answer_in_text(server) -> None:
    tool = TOOLS[0][0]
    asked = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [asked]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21, "sky": "sunny"}'},
    ]
    reply = sdk_client(server).chat.completions.create(
        model=server.core.model_name, messages=history, tools=[tool], temperature=0, max_tokens=40
    )
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls  # auto: text or a call, either parsed


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"tools": [TOOLS[0][0]], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice", "'nope' is not in tools"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [TOOLS[0][0], TOOLS[0][0]]}, "tools", "unique"),
        ({"tools": [function("f", "", {"x": {"type": "objec"}}, [])], "tool_choice": "required"}, "tools",
         "Invalid type"),
        ({"tools": [TOOLS[0][0]], "tool_choice": "required", "response_format": {"type": "json_object"}},
         "tool_choice", "both constrain"),
    ],
)  # fmt: skip
def test_a_tool_choice_that_cannot_be_honoured_is_a_400_naming_it(server, body, param, words) -> None:
    assert_refused_chat(server, body, param, words)
