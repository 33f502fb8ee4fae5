"""The Responses API through the official `openai` SDK, unchanged, against SmolLM2 served colocated and through the
PD graph: `responses.create` whole and streamed (the typed events in order, their text the response's), with a
function tool whose call's arguments follow its parameters and a follow-up that answers the call through
`previous_response_id`, with `text.format` a JSON schema; a request shaped as OpenAI's Codex CLI sends it
(developer messages, a namespace of functions, hosted tools, reasoning, include, not stored) streamed to its
`response.completed`; a failure after the start ended by `response.failed`; and what it cannot do refused by name."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import ResponseFailedEvent
from structlog.testing import capture_logs

from sagellm.gateway.openai.responses.events import ResponseEvents, response_error
from sagellm.gateway.openai.responses.tools import function_tools
from sagellm.gateway.replies.tool_parsers import ToolCall
from tests.gateway.conftest import REPLY_TIMEOUT_S, sdk_client

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
        ({"background": True, "store": False}, "store"),
        ({"tools": [{"type": "web_search"}], "tool_choice": {"type": "web_search"}}, "tool_choice"),
        ({"tools": [{"type": "web_search"}], "tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "web_search"}}, "tool_choice"),
        ({"tools": [{"type": "hologram"}]}, "tools[0].type"),
        ({"include": ["message.output_text.logprobs"]}, "include[0]"),
        ({"include": ["everything"]}, "include[0]"),
        ({"input": [{"type": "image_generation_call"}]}, "input[0]"),
    ]:
        reply = httpx.post(server.url + "/v1/responses", json={"input": "hi", **body}, timeout=60)
        assert reply.status_code == 400 and param in (reply.json()["error"]["param"] or ""), reply.text


def _param(name: str, description: str, **properties: Any) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}
    return {"type": "function", "name": name, "description": description, "strict": False, "parameters": schema}


TEXT = {"type": "string"}
# The nine tools Codex (0.171) sends, as it shapes them (its descriptions shortened): functions with `strict: false`,
# a `namespace` holding the sub-agent functions, and the hosted `web_search`
CODEX_TOOLS = [
    _param("exec_command", "Runs a command in a PTY.", cmd=TEXT),
    _param("write_stdin", "Writes characters to a session.", session_id={"type": "number"}, chars=TEXT),
    _param("request_user_input", "Asks the user a question.", question=TEXT),
    _param("view_image", "Shows a local image.", path=TEXT),
    {"type": "namespace", "name": "multi_agent_v1", "description": "Tools for spawning and managing sub-agents.",
     "tools": [_param("spawn_agent", "Spawn a sub-agent.", message=TEXT), _param("close_agent", "Close an agent.",
                                                                                target=TEXT)]},
    _param("get_goal", "Reads the goal."),
    _param("create_goal", "Sets the goal.", objective=TEXT),
    _param("update_goal", "Updates the goal.", status=TEXT),
    {"type": "web_search", "external_web_access": False},
]  # fmt: skip


def codex_request(model: str, words: str, **fields: Any) -> dict[str, Any]:
    """A body as `codex exec` sends it (its fields, in its order), with `words` the user's."""
    developer = "You are a coding agent. Answer in one short sentence."
    return {
        "model": model,
        "stream": True,
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": developer}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "cwd: /tmp/work"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": words}]},
        ],
        "tools": CODEX_TOOLS,
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0199a0b1-codex-thread",
        "client_metadata": {"session_id": "0199a0b1-codex-thread"},
        **fields,
    }


def stream_events(server, body: dict[str, Any]) -> list[dict[str, Any]]:
    headers = {"authorization": "Bearer sk-codex", "accept": "text/event-stream"}
    url = server.url + "/v1/responses"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=REPLY_TIMEOUT_S) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line.removeprefix("data: ")) for line in response.iter_lines() if line.startswith("data:")]


def test_a_request_shaped_as_codex_sends_it_streams_to_its_completion(server) -> None:
    body = codex_request(server.core.model_name, "Say hello.", temperature=0, max_output_tokens=16)
    events = [stream_events(server, body) for _ in range(2)]  # the second finds the first's prefix cached
    for each in events:
        kinds = [event["type"] for event in each]
        assert kinds[:2] == ["response.created", "response.in_progress"]
        assert kinds[-1] in ("response.completed", "response.incomplete") and "error" not in kinds
        assert [event["sequence_number"] for event in each] == list(range(len(each)))
    created, last = events[1][0]["response"], events[1][-1]["response"]
    assert created["reasoning"] == {"effort": "medium", "summary": "auto"} and created["store"] is False
    assert created["prompt_cache_key"] == "0199a0b1-codex-thread" and created["tools"] == CODEX_TOOLS
    assert not [item for item in last["output"] if item["type"] == "reasoning"]
    assert last["usage"]["input_tokens_details"]["cached_tokens"] > 0
    assert last["usage"]["output_tokens_details"] == {"reasoning_tokens": 0}
    # `store: false`: not kept, so nothing continues it
    follow_up = httpx.post(server.url + "/v1/responses", timeout=REPLY_TIMEOUT_S,
                           json={"input": "and?", "previous_response_id": last["id"]})  # fmt: skip
    assert follow_up.status_code == 404 and follow_up.json()["error"]["param"] == "previous_response_id"


def test_a_namespaced_function_is_called_by_its_name_and_namespace(server) -> None:
    body = codex_request(server.core.model_name, "Spawn an agent to list the files.", temperature=0,
                         max_output_tokens=60, tool_choice={"type": "function", "name": "spawn_agent"})  # fmt: skip
    events = stream_events(server, body)
    assert events[-1]["type"] == "response.completed"
    (call,) = [item for item in events[-1]["response"]["output"] if item["type"] == "function_call"]
    assert call["name"] == "spawn_agent" and call["namespace"] == "multi_agent_v1"
    assert set(json.loads(call["arguments"])) == {"message"}
    done = [e["item"] for e in events if e["type"] == "response.output_item.done" and e["item"]["type"] != "message"]
    assert done == [call]


def test_a_failure_after_the_start_ends_the_stream_with_response_failed(server) -> None:
    """The engine's fourth step raises (after the first tokens went out), as `test_openai_api`'s completions do."""
    if server.graph != "colocated":
        pytest.skip("the PD graph's engines run in their own processes, out of this test's reach")
    (engine,) = server.core.nodes_of("engine").values()
    real_step, steps = engine.step, []

    def failing_step():
        steps.append(1)
        if len(steps) == 4:
            raise RuntimeError("injected engine failure")
        return real_step()

    server.call(setattr, engine, "step", failing_step)
    try:
        body = {"input": "Count to fifty.", "stream": True, "max_output_tokens": 40, "temperature": 0}
        events = stream_events(server, body)
    finally:
        server.call(delattr, engine, "step")
    kinds = [event["type"] for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.failed" and "error" not in kinds
    failed = ResponseFailedEvent.model_validate(events[-1]).response
    assert failed.status == "failed" and failed.error.code == "server_error"
    assert "injected engine failure" in failed.error.message
    assert sdk_client(server).responses.create(input="Hi", max_output_tokens=2).output  # the server goes on


def test_tools_the_server_cannot_run_are_left_out_with_a_log_line() -> None:
    with capture_logs() as logs:
        found = function_tools(CODEX_TOOLS)
    names = [tool.function.name for tool in found.tools]
    assert names == ["exec_command", "write_stdin", "request_user_input", "view_image", "spawn_agent", "close_agent",
                     "get_goal", "create_goal", "update_goal"]  # fmt: skip
    assert found.namespaces == {"spawn_agent": "multi_agent_v1", "close_agent": "multi_agent_v1"}
    (skipped,) = [entry for entry in logs if entry["event"] == "responses_tool_skipped"]
    assert skipped["tool_type"] == "web_search" and skipped["where"] == "tools[8]"


def test_the_failed_event_is_openais_shape() -> None:
    events = ResponseEvents({"id": "resp_1", "status": "in_progress"}, {"spawn_agent": "multi_agent_v1"})
    events.start()
    events.text("Hel")
    events.call(ToolCall(name="spawn_agent", arguments="{}"))
    failed = {"id": "resp_1", "object": "response", "created_at": 0, "status": "failed", "model": "m", "output": [],
              "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
              "error": response_error("internal", "the engine failed")}  # fmt: skip
    (event,) = events.fail(failed)
    parsed = ResponseFailedEvent.model_validate(event)
    assert parsed.sequence_number == events.sequence - 1 and parsed.response.error.code == "server_error"
    message, call = parsed.response.output
    assert message.status == "completed" and message.content[0].text == "Hel"
    assert call.namespace == "multi_agent_v1" and response_error("overloaded", "busy")["code"] == "rate_limit_exceeded"
