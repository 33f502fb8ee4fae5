"""Tool parsers read a model's calls back out of its reply, whole or streamed, and the fallback chat template writes
tools and calls in the format the `hermes` parser reads."""

from __future__ import annotations

import json
import re

import pytest

from sagellm.common.errors import InvalidInput
from sagellm.gateway.replies.tool_parsers import (
    FALLBACK_TEMPLATE,
    ContentEvent,
    StreamEvent,
    ToolCall,
    ToolCallEvent,
    default_parser,
    parser_for,
)
from tests.tiny_models import make_tokenizer

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Rome", "note": "été"}}\n</tool_call>'


def calls(parsed: list[ToolCall]) -> list[tuple[str, dict]]:
    return [(call.name, json.loads(call.arguments)) for call in parsed]


def stream(parser_name: str, pieces: list[str] | str) -> tuple[list[str], list[ToolCallEvent]]:
    """Feeds `pieces` one by one (a string: one character at a time) and splits the events by kind."""
    parser = parser_for(parser_name)
    events: list[StreamEvent] = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    return [e.text for e in events if isinstance(e, ContentEvent)], [e for e in events if isinstance(e, ToolCallEvent)]


def test_hermes_reads_a_call_and_writes_its_arguments_as_json_text():
    content, parsed = parser_for("hermes").parse(WEATHER)
    assert content is None
    assert calls(parsed) == [("get_weather", {"city": "Paris"})]
    assert parsed[0].arguments == '{"city": "Paris"}'
    assert re.fullmatch(r"call_[0-9a-f]{24}", parsed[0].id)


def test_hermes_reads_two_calls_after_text():
    content, parsed = parser_for("hermes").parse(f"Let me look both up.\n{WEATHER}\n{TIME}\n")
    assert content == "Let me look both up."
    assert calls(parsed) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "Europe/Rome", "note": "été"})]
    assert '"été"' in parsed[1].arguments  # not escaped: ensure_ascii=False
    assert parsed[0].id != parsed[1].id


def test_hermes_leaves_a_block_it_cannot_read_as_content():
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
    content, parsed = parser_for("hermes").parse(f"Before. {broken} {WEATHER}")
    assert content == f"Before. {broken}"
    assert calls(parsed) == [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize(
    "block",
    [
        '{"name": "f", "arguments": [1, 2]}',  # arguments not an object
        '{"name": "f", "arguments": "not json"}',
        '{"name": "f", "arguments": "[1]"}',  # a JSON string, of no object
        '{"arguments": {}}',  # no name
        '{"name": "f"}',  # no arguments
    ],
)
def test_hermes_leaves_json_that_is_not_a_call_as_content(block: str):
    text = f"<tool_call>{block}</tool_call>"
    assert parser_for("hermes").parse(text) == (text, [])


def test_hermes_accepts_arguments_given_as_a_json_string():
    text = '<tool_call>{"name": "f", "arguments": "{\\"a\\": [1, {\\"b\\": null}]}"}</tool_call>'
    _, parsed = parser_for("hermes").parse(text)
    assert calls(parsed) == [("f", {"a": [1, {"b": None}]})]
    assert parsed[0].arguments == json.dumps({"a": [1, {"b": None}]})


def test_hermes_reads_a_block_the_reply_ends_inside_if_its_json_reads():
    assert calls(parser_for("hermes").parse(WEATHER.removesuffix("</tool_call>"))[1]) == [
        ("get_weather", {"city": "Paris"})
    ]
    assert parser_for("hermes").parse('Hm <tool_call>{"name": "f", "argu') == ('Hm <tool_call>{"name": "f", "argu', [])


REPLIES = [
    f"Let me look both up.\n{WEATHER}\n{TIME}\n",
    f"  {WEATHER}Between < the calls <tool_c {TIME}  and after.  ",
    f"Before. <tool_call>{{bad json</tool_call> {WEATHER} after",
    "Plain text with a < and a <tool and <tool_call",
    WEATHER.removesuffix("\n</tool_call>"),
]


@pytest.mark.parametrize("reply", REPLIES)
def test_hermes_streamed_a_character_at_a_time_equals_the_whole_reply_parsed(reply: str):
    content, parsed = parser_for("hermes").parse(reply)
    pieces, events = stream("hermes", reply)
    assert ("".join(pieces) or None) == content
    assert [event.index for event in events] == list(range(len(parsed)))
    assert calls([event.call for event in events]) == calls(parsed)


def test_hermes_holds_back_a_possible_tag_and_releases_it_when_it_is_not_one():
    parser = parser_for("hermes")
    assert parser.feed("Hi <tool_c") == [ContentEvent("Hi")]  # the space waits for more content
    assert parser.feed("ool> x") == [ContentEvent(" <tool_cool> x")]
    assert parser.feed(" <") == []
    assert parser.finish() == [ContentEvent(" <")]


def test_hermes_streams_each_call_whole_when_its_block_closes():
    parser = parser_for("hermes")
    assert parser.feed("Sure.\n" + WEATHER[:30]) == [ContentEvent("Sure.")]
    (event,) = parser.feed(WEATHER[30:])
    assert isinstance(event, ToolCallEvent) and event.index == 0
    assert calls([event.call]) == [("get_weather", {"city": "Paris"})]
    (event,) = parser.feed(TIME)
    assert isinstance(event, ToolCallEvent) and event.index == 1
    assert parser.finish() == []


def test_llama3_json_reads_a_call_with_parameters_or_arguments():
    content, parsed = parser_for("llama3_json").parse('{"name": "get_weather", "parameters": {"city": "Paris"}}')
    assert content is None
    assert calls(parsed) == [("get_weather", {"city": "Paris"})]
    _, parsed = parser_for("llama3_json").parse(' {"name": "f", "arguments": {}} ')
    assert calls(parsed) == [("f", {})]


def test_llama3_json_reads_calls_joined_by_semicolons_after_the_python_tag():
    reply = '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {"y": "é"}};'
    content, parsed = parser_for("llama3_json").parse(reply)
    assert content is None
    assert calls(parsed) == [("a", {"x": 1}), ("b", {"y": "é"})]
    pieces, events = stream("llama3_json", reply)
    assert pieces == [] and [event.index for event in events] == [0, 1]
    assert calls([event.call for event in events]) == calls(parsed)


@pytest.mark.parametrize(
    "reply",
    [
        'Here: {"name": "a", "parameters": {}}',  # text first: not a call
        '{"name": "a", "parameters": {}} and some text',
        '{"name": "a", "parameters": {}}; {"city": "Paris"}',  # one part not a call: all content
        '{"name": "a", "parameters": {',
        "<|python_tag|>print(1)",
    ],
)
def test_llama3_json_keeps_a_reply_that_is_not_all_calls_as_content(reply: str):
    assert parser_for("llama3_json").parse(reply) == (reply, [])
    assert "".join(stream("llama3_json", reply)[0]) == reply


def test_llama3_json_streams_content_as_soon_as_it_cannot_be_a_call():
    parser = parser_for("llama3_json")
    assert parser.feed(" <|py") == []
    assert parser.feed("rint") == [ContentEvent("<|pyrint")]
    assert parser.feed(" more ") == [ContentEvent(" more")]
    assert parser.finish() == []


def test_an_unknown_parser_name_lists_the_known_ones():
    with pytest.raises(InvalidInput, match=r"unknown tool parser 'mistral'; known: hermes, llama3_json"):
        parser_for("mistral")


def test_each_reply_gets_a_parser_of_its_own():
    first, second = parser_for("hermes"), parser_for("hermes")
    first.feed("<tool_call>")
    assert second.feed("text") == [ContentEvent("text")]


@pytest.mark.parametrize(
    ("template", "model_type", "name"),
    [
        ("{{ '<|im_start|>' }}{% if tools %}<tool_call>{% endif %}", "qwen2", "hermes"),
        ("{{ '<|im_start|>' + message['role'] }}", "llama", "hermes"),  # SmolLM2: ChatML, model_type llama
        ("<|start_header_id|>{{ role }}<|end_header_id|>", "llama", "llama3_json"),
        ("{{ '<|python_tag|>' }}", None, "llama3_json"),
        ("[INST] {{ content }} [/INST]", "mistral", "hermes"),
        (None, "mllama", "llama3_json"),
        (None, None, "hermes"),
    ],
)
def test_default_parser_follows_the_chat_template(template: str | None, model_type: str | None, name: str):
    assert default_parser(template, model_type) == name


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "24 C"},
    {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
    {"role": "tool", "tool_call_id": "call_3", "content": "done"},
    {"role": "assistant", "content": "Paris 18 C, Rome 24 C."},
    {"role": "user", "content": "Thanks"},
]
RENDERED = (
    "<|im_start|>system\nBe brief.\n\n# Tools\n\n"
    "You can call functions to help answer the user. Their signatures are listed, one JSON object a line, within "
    "<tools></tools> XML tags:\n<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>\n\n"
    "To call a function, answer with a JSON object holding its name and arguments within <tool_call></tool_call> "
    'XML tags, one block per call:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
    "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
    "<|im_start|>assistant\nChecking.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<tool_response>\n18 C\n</tool_response>\n<tool_response>\n24 C\n</tool_response><|im_end|>\n"
    '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<tool_response>\ndone\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\nParis 18 C, Rome 24 C.<|im_end|>\n"
    "<|im_start|>user\nThanks<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def render(messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool = True) -> str:
    """The fallback template rendered as the server renders it: transformers' `apply_chat_template` (here on a tiny
    tokenizer built offline, since only the template matters)."""
    return make_tokenizer().apply_chat_template(
        messages,
        tools=tools,
        chat_template=FALLBACK_TEMPLATE,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def test_fallback_template_renders_tools_calls_and_results_in_chatml():
    assert render(CONVERSATION, TOOLS) == RENDERED


def test_fallback_template_without_tools_is_plain_chatml():
    assert render(CONVERSATION[:2], None, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
    )
    assert render(CONVERSATION[1:2], TOOLS).startswith("<|im_start|>system\n# Tools\n\n")


def test_what_the_fallback_template_writes_the_hermes_parser_reads():
    assistant_turn = render(CONVERSATION[:3], TOOLS, add_generation_prompt=False).rsplit("<|im_start|>assistant\n")[-1]
    content, parsed = parser_for("hermes").parse(assistant_turn.removesuffix("<|im_end|>\n"))
    assert content == "Checking."
    assert calls(parsed) == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
