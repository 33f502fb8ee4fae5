"""The Anthropic Messages API through the official `anthropic` SDK, unchanged, against SmolLM2 served colocated and
through the PD graph: `messages.create` whole and streamed (Anthropic's events in order, their text the message's),
`count_tokens` against the usage a message reports, forced tool calls whose input follows the tool's schema 20 of 20
at temperature 0.7, a `tool_result` round trip, stop sequences, and errors in Anthropic's shape and status."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import jsonschema
import pytest

from sagellm.gateway.anthropic.protocol import MessagesRequest, chat_body
from sagellm.gateway.http.app import HttpRequest

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(900)]

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0}  # the SDK's create() takes sampling settings as extra body fields (the API still does)


def sdk(server) -> anthropic.Anthropic:
    """The official anthropic SDK against `server`, as Claude Code's environment points it (no retries)."""
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=300)


def test_a_message_whole_and_streamed_says_the_same(server) -> None:
    client = sdk(server)
    asked = dict(model=server.core.model_name, max_tokens=24, messages=QUESTION, system="Be brief.", extra_body=GREEDY)
    whole = client.messages.create(**asked)
    assert whole.type == "message" and whole.role == "assistant" and whole.id.startswith("msg_")
    assert whole.stop_reason in ("end_turn", "max_tokens") and whole.content[0].type == "text"
    assert whole.usage.input_tokens + whole.usage.cache_read_input_tokens > 0 and 0 < whole.usage.output_tokens <= 24
    with client.messages.stream(**asked) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens


def test_the_stream_is_anthropics_event_sequence(server) -> None:
    body = {"model": server.core.model_name, "max_tokens": 16, "temperature": 0, "stream": True, "messages": QUESTION}
    with httpx.stream("POST", server.url + "/v1/messages?beta=true", json=body, timeout=300) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in datas] == names  # every event named as its data's type
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert set(names[3:-3]) == {"content_block_delta"} and names[-3:] == ["content_block_stop", "message_delta",
                                                                           "message_stop"]  # fmt: skip
    delta = datas[-2]
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens") and delta["usage"]["output_tokens"] > 0


def test_count_tokens_is_what_the_message_is_charged(server) -> None:
    client = sdk(server)
    asked = dict(model=server.core.model_name, messages=QUESTION, system="Be brief.", tools=[WEATHER])
    counted = client.messages.count_tokens(**asked)
    charged = client.messages.create(**asked, max_tokens=4, extra_body=GREEDY).usage
    assert counted.input_tokens == charged.input_tokens + charged.cache_read_input_tokens > 0


@pytest.mark.parametrize("choice", [{"type": "tool", "name": "get_weather"}, {"type": "any"}], ids=["tool", "any"])
def test_a_forced_tool_call_always_follows_the_schema(server, choice) -> None:
    client = sdk(server)
    runs = 20
    # room for the longest call the schema allows: sampled, a city can be 12 \u escapes of six one-character tokens
    # each (72), plus the call's ~40 (CI saw a 30-character one of them pass 200 tokens)
    schema = {**WEATHER["input_schema"], "properties": {**WEATHER["input_schema"]["properties"],
                                                        "city": {"type": "string", "maxLength": 12}}}  # fmt: skip
    tool = {**WEATHER, "input_schema": schema}

    def ask(i: int) -> anthropic.types.Message:
        question = [{"role": "user", "content": f"Weather in city number {i}?"}]
        return client.messages.create(model=server.core.model_name, max_tokens=200, tools=[tool], tool_choice=choice,
                                      messages=question, extra_body={"temperature": 0.7})  # fmt: skip

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(runs)))
    for reply in replies:
        assert reply.stop_reason == "tool_use", [getattr(block, "text", block) for block in reply.content]
        (use,) = [block for block in reply.content if block.type == "tool_use"]
        assert use.name == "get_weather" and use.id.startswith("toolu_")
        jsonschema.validate(use.input, schema)


def test_a_tool_result_round_trip_and_its_stream(server) -> None:
    client = sdk(server)
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.messages.create(model=server.core.model_name, max_tokens=80, tools=[WEATHER],
                                   tool_choice={"type": "any"}, messages=question, extra_body=GREEDY)  # fmt: skip
    (use,) = [block for block in first.content if block.type == "tool_use"]
    result = {"type": "tool_result", "tool_use_id": use.id, "content": [{"type": "text", "text": "21 degrees"}]}
    history = [*question, {"role": "assistant", "content": first.content}, {"role": "user", "content": [result]}]
    second = client.messages.create(model=server.core.model_name, max_tokens=30, tools=[WEATHER], messages=history,
                                    extra_body=GREEDY)  # fmt: skip
    assert second.content and second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    with client.messages.stream(
        model=server.core.model_name,
        max_tokens=80,
        tools=[WEATHER],
        extra_body=GREEDY,
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=question,
    ) as stream:
        final = stream.get_final_message()  # fmt: skip
    (streamed,) = [block for block in final.content if block.type == "tool_use"]
    assert final.stop_reason == "tool_use" and streamed.input == use.input  # greedy: the same call either way


def test_a_stop_sequence_ends_the_message_and_is_named(server) -> None:
    client = sdk(server)
    asked = dict(model=server.core.model_name, max_tokens=24, messages=QUESTION, extra_body=GREEDY)
    text = client.messages.create(**asked).content[0].text
    word = text.split()[2]  # a word the greedy reply reaches
    cut = client.messages.create(**asked, stop_sequences=[word, "never-said"])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == word
    assert text.startswith(cut.content[0].text) and word not in cut.content[0].text


def test_errors_have_anthropics_shape_and_status(server) -> None:
    if server.graph != "colocated":
        pytest.skip("the front end's check is the same on every graph")
    client = sdk(server)
    with pytest.raises(anthropic.BadRequestError) as no_max_tokens:
        client.messages.create(model=server.core.model_name, messages=QUESTION, max_tokens=anthropic.NOT_GIVEN)
    assert no_max_tokens.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in no_max_tokens.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as unknown:
        client.messages.create(model="claude-nonexistent", messages=QUESTION, max_tokens=8)
    assert unknown.value.body == {"type": "error", "error": {"type": "not_found_error", "message": unknown.value.body[
        "error"]["message"]}}  # fmt: skip
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model=server.core.model_name, max_tokens=8,
                               messages=[{"role": "user", "content": [image]}])  # fmt: skip
    message = refused.value.body["error"]["message"]
    assert "messages[0].content[0].source" in message and "takes no images" in message, message
    with pytest.raises(anthropic.BadRequestError) as thinking:
        client.messages.create(model=server.core.model_name, max_tokens=8, messages=QUESTION,
                               thinking={"type": "enabled", "budget_tokens": 1024})  # fmt: skip
    assert "thinking" in thinking.value.body["error"]["message"]
    assert httpx.head(server.url + "/", timeout=30).status_code == 200  # Claude Code's reachability check


def test_what_claude_code_sends_that_asks_for_nothing_is_accepted() -> None:
    """Cache control on blocks, betas' fields, a system message mid-conversation and adaptive thinking: the chat
    they make, without a server."""
    body = {
        "model": "m", "max_tokens": 32000, "stream": True,
        "system": [{"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
            {"role": "system", "content": "Reminder: be brief."},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "...", "signature": "x"},
                                              {"type": "text", "text": "Hello."}]},
            {"role": "user", "content": "Bye."},
        ],
        "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
        "context_management": {"edits": []}, "metadata": {"user_id": "u1"},
        "tools": [{**WEATHER, "cache_control": {"type": "ephemeral"}}, {"type": "web_search_20250305", "name": "web"}],
    }  # fmt: skip
    request = HttpRequest("POST", "/v1/messages", {}, {}, json.dumps(body).encode())
    chat = chat_body(request.json(MessagesRequest), "m")
    assert [(m.role, m.content) for m in chat.messages] == [
        ("system", "You are a coding agent."), ("user", "hi"), ("system", "Reminder: be brief."),
        ("assistant", "Hello."), ("user", "Bye."),
    ]  # fmt: skip
    assert [tool.function.name for tool in chat.tools] == ["get_weather"] and chat.user == "u1"
    assert chat.max_tokens == 32000 and chat.stream
