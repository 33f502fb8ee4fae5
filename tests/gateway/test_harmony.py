"""gpt-oss's Harmony format in the gateway: the Harmony template's rendering against hand-written prompts (tools,
calls and their results, thinking kept or dropped, reasoning_effort); the Harmony reader on whole replies and on
every cut of their stream; which template and parsers a model gets by default; and end to end, a real gateway on a
tiny random model whose tokenizer has Harmony's special tokens, its replies forced into Harmony by grammars written
in those tokens, read by the openai and anthropic SDKs into thinking, answer and tool calls."""

from __future__ import annotations

import datetime
import json
from types import SimpleNamespace

import anthropic
import httpx
import openai
import pytest

from sagellm.gateway.openai.responses.protocol import Reasoning, reasoning_effort
from sagellm.gateway.replies.chat_templates import HARMONY_TEMPLATE, fallback_template, rendering_template
from sagellm.gateway.replies.events import ContentEvent
from sagellm.gateway.replies.harmony import HarmonyReader
from sagellm.gateway.replies.reader import ReplyPlan, ReplyReader
from sagellm.gateway.replies.reasoning_parsers import GptOssParser, parser_class
from sagellm.gateway.replies.reasoning_parsers import default_parser as default_reasoning
from sagellm.gateway.replies.tool_parsers import OpenAIParser, parser_for
from sagellm.gateway.replies.tool_parsers import default_parser as default_tools
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.pipeline.served_model import GIVEN, served_model
from tests.gateway.conftest import GRAPHS, assert_refused_chat, running_gateway, tiny_config
from tests.gateway.harmony_model import make_harmony_tokenizer, make_tiny_harmony
from tests.gateway.test_reply_reader import _read, _seen
from tests.tiny_models import write_tiny_gguf

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Gets the weather",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "City"},
        "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
        "days": {"type": ["integer", "null"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    }, "required": ["location"]},
}}  # fmt: skip
NOW = {"type": "function", "function": {"name": "now", "description": "The time\nin UTC"}}
# A forced call's arguments bounded, so a random model's call ends well within max_tokens
CITY = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"location": {"type": "string", "pattern": "^[a-z]{2,6}$"}},
    "required": ["location"], "additionalProperties": False}}}  # fmt: skip
HARMONY = SimpleNamespace(architecture="gpt_oss")  # a gpt-oss model's config, as far as the gateway reads it


def _system(effort: str = "medium", tools: bool = False) -> str:
    calls = "\nCalls to these tools must go to the commentary channel: 'functions'." if tools else ""
    return (f"<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: "
            f"2024-06\nCurrent date: {datetime.date.today():%Y-%m-%d}\n\nReasoning: {effort}\n\n# Valid channels: "
            f"analysis, commentary, final. Channel must be included for every message.{calls}<|end|>")  # fmt: skip


def _render(messages: list[dict], tools: list[dict] | None = None, **kwargs) -> str:
    tokenizer = make_harmony_tokenizer()
    return tokenizer.apply_chat_template(messages, tools=tools, chat_template=HARMONY_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True, **kwargs)  # fmt: skip


# -- rendering ---------------------------------------------------------------------------------------------------


def test_a_plain_chat_renders_as_harmony() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello.", "reasoning_content": "greet back"},
                {"role": "user", "content": "What is 2+2?"}]  # fmt: skip
    expected = (_system() + "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n<|end|>"
                "<|start|>user<|message|>Hi<|end|>"
                "<|start|>assistant<|channel|>final<|message|>Hello.<|end|>"  # an answered turn's thinking is dropped
                "<|start|>user<|message|>What is 2+2?<|end|><|start|>assistant")  # fmt: skip
    assert _render(messages) == expected
    assert _render(messages[1:2], reasoning_effort="low") == (
        _system("low") + "<|start|>user<|message|>Hi<|end|><|start|>assistant"
    )


def test_tools_calls_and_their_results_render_as_harmony() -> None:
    messages = [
        {"role": "user", "content": "Weather in SF?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Need the weather.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"location":"SF"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": {}}},
        ]},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sunny": true}'},
    ]  # fmt: skip
    tools_text = ("# Tools\n\n## functions\n\nnamespace functions {\n\n// Gets the weather\n"
                  "type get_weather = (_: {\n// City\nlocation: string,\nunit?: \"c\" | \"f\", // default: c\n"
                  "days?: number | null,\ntags?: string[],\n}) => any;\n\n"
                  "// The time\n// in UTC\ntype now = () => any;\n\n} // namespace functions")  # fmt: skip
    expected = (
        _system("high", tools=True) + f"<|start|>developer<|message|>{tools_text}<|end|>"
        "<|start|>user<|message|>Weather in SF?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Need the weather.<|end|>"  # kept: no answer follows yet
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"location":"SF"}<|call|>'
        "<|start|>assistant to=functions.now<|channel|>commentary json<|message|>{}<|call|>"
        '<|start|>functions.now to=assistant<|channel|>commentary<|message|>"12:00"<|end|>'  # results as JSON strings
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"{\\"sunny\\": true}"<|end|>'
        "<|start|>assistant"
    )  # fmt: skip
    assert _render(messages, [WEATHER, NOW], reasoning_effort="high") == expected
    answered = [*messages, {"role": "assistant", "content": "Sunny."}]
    assert "Need the weather." not in _render(answered, [WEATHER, NOW])  # the thinking goes once an answer follows
    no_thinking = [messages[0], {k: v for k, v in messages[1].items() if k != "reasoning_content"}]
    assert "<|channel|>analysis<|message|>Checking.<|end|>" in _render(no_thinking, [WEATHER, NOW])  # text: thinking


# -- reading -----------------------------------------------------------------------------------------------------

ARGS = '{"location":"SF"}'
# reply -> (thinking, answer, calls as (name, arguments)), read with calls read
CASES = {
    "thinks then answers": ("<|channel|>analysis<|message|>User asks.<|end|><|start|>assistant<|channel|>final"
                            "<|message|>2 + 2 = 4.", ("User asks.", "2 + 2 = 4.", [])),
    "thinks then calls": ("<|channel|>analysis<|message|>Need it.<|end|><|start|>assistant<|channel|>commentary "
                          f"to=functions.get_weather <|constrain|>json<|message|>{ARGS}",
                          ("Need it.", None, [("get_weather", '{"location": "SF"}')])),
    "recipient in the role part": (f" to=functions.get_weather<|channel|>commentary json<|message|>{ARGS}<|call|>",
                                   (None, None, [("get_weather", '{"location": "SF"}')])),
    "a preamble, two calls": ("<|channel|>commentary<|message|>Plan: two calls.<|end|><|start|>assistant<|channel|>"
                              f"commentary to=functions.a <|constrain|>json<|message|>{{}}<|end|><|start|>assistant"
                              f"<|channel|>commentary to=functions.b<|message|>{ARGS}<|call|>",
                              (None, "Plan: two calls.", [("a", "{}"), ("b", '{"location": "SF"}')])),
    "an answer with its end token": ("<|channel|>final<|message|>Done <|end|>ish<|return|>", (None, "Done ", [])),
    "broken arguments stay text": ("<|channel|>commentary to=functions.f<|message|>{oops", (None, "{oops", [])),
    "not Harmony at all": ("Just text.", (None, "Just text.", [])),
    "a built-in tool is thinking": ("<|channel|>analysis to=browser.search<|message|>{\"q\": 1}<|end|>"
                                    "<|start|>assistant<|channel|>final<|message|>ok",
                                    ('{"q": 1}', "ok", [])),
    "cut inside a header": ("<|channel|>analysis<|message|>hmm<|end|><|start|>assistant<|chan",
                            ("hmm", None, [])),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_the_reading_does_not_depend_on_where_the_stream_was_cut(case: str) -> None:
    text, expected = CASES[case]
    plan = ReplyPlan(tool_parser="openai", reasoning_parser="openai_gptoss")
    assert _seen(ReplyReader.whole(plan, text)) == expected
    for cut in range(len(text) + 1):
        assert _read([text[:cut], text[cut:]], plan) == expected, cut
    for first in range(0, len(text), 7):  # three pieces: every cut of the rest after a first cut
        for second in range(first, len(text) + 1, 3):
            assert _read([text[:first], text[first:second], text[second:]], plan) == expected, (first, second)
    assert _read(list(text), plan) == expected


def test_each_parser_alone_reads_its_part() -> None:
    text = CASES["thinks then calls"][0]
    assert GptOssParser.split(text, inside=False) == ("Need it.", f"{ARGS}")  # calls unread: their text is answer
    assert OpenAIParser.parse(text)[1][0].name == "get_weather" and OpenAIParser.parse(text)[0] is None
    only_reasoning = ReplyPlan(reasoning_parser="openai_gptoss")  # no tools offered: a call stays text
    assert _seen(ReplyReader.whole(only_reasoning, text)) == ("Need it.", ARGS, [])
    assert HarmonyReader.read("<|channel|>final<|message|>x", read_calls=False) == [ContentEvent("x")]
    assert parser_class("openai_gptoss") is GptOssParser and isinstance(parser_for("openai"), OpenAIParser)
    assert GptOssParser.closing() == "<|end|><|start|>assistant<|channel|>final<|message|>"


def test_a_gpt_oss_model_gets_harmony_by_default() -> None:
    bare = make_harmony_tokenizer()
    assert fallback_template(bare, HARMONY) == HARMONY_TEMPLATE == rendering_template(bare, HARMONY)
    assert fallback_template(bare, SimpleNamespace(architecture="llama")) is None
    own = make_harmony_tokenizer(chat_template="{{ '<|start|>' }}<|channel|>")
    assert fallback_template(own, HARMONY) is None and rendering_template(own, HARMONY) == own.chat_template
    assert default_reasoning(HARMONY_TEMPLATE) == "openai_gptoss" and default_tools(HARMONY_TEMPLATE) == "openai"
    assert ReplyPlan(reasoning_parser="openai_gptoss").harmony and not ReplyPlan(reasoning_parser="qwen3").harmony
    assert [reasoning_effort(Reasoning(effort=e)) for e in ("minimal", "medium", "xhigh")] == ["low", "medium", "high"]


# -- end to end --------------------------------------------------------------------------------------------------

pytestmark_slow = pytest.mark.slow
THINK_ANSWER = ('start: <|channel|> "analysis" <|message|> /[a-z]{3,10}/ <|end|> <|start|> "assistant" <|channel|> '
                '"final" <|message|> /[a-z]{2,8}/\n')  # fmt: skip
THINK_CALL = ('start: <|channel|> "analysis" <|message|> /[a-z]{3,10}/ <|end|> <|start|> "assistant" <|channel|> '
              '"commentary to=functions.get_weather " <|constrain|> "json" <|message|> '
              '"{\\"location\\":\\"" /[a-z]{2,6}/ "\\"}"\n')  # fmt: skip
CHAT = [{"role": "user", "content": "What is the weather in SF?"}]


@pytest.fixture(scope="module")
def harmony_gateway(tmp_path_factory):
    """The tiny Harmony model, a gpt-oss whose tokenizer has no template: Harmony's template renders its chats and
    its parsers read its replies, by default."""
    model = make_tiny_harmony(tmp_path_factory.mktemp("harmony") / "tiny-harmony")
    served = served_model({"model": str(model)})
    assert served.config.architecture == "gpt_oss" and not served.tokenizer.chat_template
    config = tiny_config(tmp_path_factory.mktemp("harmony-gw"))
    with running_gateway(GRAPHS / "colocated.yaml", config, model, attrs={GIVEN: served}) as gateway:
        gateway.sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield gateway


@pytestmark_slow
def test_thinking_and_answer_come_apart_whole_and_read(harmony_gateway) -> None:
    sdk = harmony_gateway.sdk
    asked = dict(model=harmony_gateway.core.model_name, messages=CHAT, max_tokens=48, temperature=0,
                 reasoning_effort="high", extra_body={"structured_outputs": {"grammar": THINK_ANSWER},
                                                      "return_token_ids": True})  # fmt: skip
    choice = sdk.chat.completions.create(**asked).choices[0]
    message = choice.message
    assert message.reasoning_content.isalpha() and message.content.isalpha() and choice.finish_reason == "stop"
    specials = make_harmony_tokenizer().convert_tokens_to_ids(["<|channel|>", "<|message|>", "<|end|>", "<|start|>"])
    assert set(specials) <= set(choice.token_ids)  # the markers were the special tokens, read from the reply's text
    deltas = [c.choices[0].delta for c in sdk.chat.completions.create(**asked, stream=True) if c.choices]
    streamed = ("".join(getattr(d, "reasoning_content", None) or "" for d in deltas), "".join(d.content or ""
                for d in deltas))  # fmt: skip
    assert streamed == (message.reasoning_content, message.content)


@pytestmark_slow
def test_a_call_made_after_thinking_is_a_tool_call_whole_and_read(harmony_gateway) -> None:
    sdk = harmony_gateway.sdk
    asked = dict(model=harmony_gateway.core.model_name, messages=CHAT, max_tokens=160, temperature=0, tools=[WEATHER],
                 extra_body={"structured_outputs": {"grammar": THINK_CALL}})  # fmt: skip
    choice = sdk.chat.completions.create(**asked).choices[0]
    (call,) = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and choice.message.reasoning_content and not choice.message.content
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["location"].isalpha()
    chunks = list(sdk.chat.completions.create(**asked, stream=True))
    calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or ()]
    assert [(t.index, t.function.name, t.function.arguments) for t in calls] == [
        (0, "get_weather", call.function.arguments)]  # fmt: skip
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytestmark_slow
def test_a_required_call_is_forced_in_harmony_on_every_api(harmony_gateway) -> None:
    gateway, model = harmony_gateway, harmony_gateway.core.model_name
    reply = gateway.sdk.chat.completions.create(model=model, messages=CHAT, max_tokens=160, temperature=0,
                                                tools=[CITY], tool_choice="required")  # fmt: skip
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and "location" in json.loads(call.function.arguments)
    response = gateway.sdk.responses.create(model=model, input="Weather in SF?", max_output_tokens=160,
                                            tools=[{"type": "function", **CITY["function"]}], tool_choice="required",
                                            reasoning={"effort": "low"}, temperature=0)  # fmt: skip
    assert [item.type for item in response.output] == ["function_call"] and response.output[0].name == "get_weather"
    messages = anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0)
    tool = {"name": "get_weather", "input_schema": CITY["function"]["parameters"]}
    message = messages.messages.create(model=model, max_tokens=160, messages=CHAT, tools=[tool],
                                       tool_choice={"type": "any"}, extra_body={"temperature": 0})  # fmt: skip
    assert [block.type for block in message.content] == ["tool_use"] and message.stop_reason == "tool_use"


@pytestmark_slow
def test_reasoning_effort_is_refused_where_nothing_honours_it(harmony_gateway, gateway) -> None:
    assert_refused_chat(gateway, {"reasoning_effort": "low"}, "reasoning_effort", "takes no reasoning effort")
    body = {"messages": CHAT, "max_tokens": 2, "reasoning_effort": "extreme"}
    reply = httpx.post(harmony_gateway.url + "/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400 and "reasoning_effort" in reply.text


def test_a_gpt_oss_gguf_ends_replies_at_return_and_call_offline_too(tmp_path) -> None:
    """llama.cpp's file names one end token; a reply also ends at a call, so the engine itself (LLM, `sagellm chat`:
    no gateway adding stop tokens) stops at both, found by their text as llama.cpp finds them."""
    model = make_tiny_harmony(tmp_path / "hf")
    config = load_model(write_tiny_gguf(tmp_path / "m.gguf", model), load_weights=False).config
    ends = make_harmony_tokenizer().convert_tokens_to_ids(["<|return|>", "<|call|>"])
    assert set(ends) <= set(config.eos_token_ids)
