"""A reasoning model's replies through the gateway: its thinking read out of the reply as `reasoning_content` (whole
and streamed, the stream's parts adding up to the whole), apart from the answer; with `--reasoning-parser` on a tiny
model whose output a regex forces into `<think>...</think>answer`, so the split is known. The Messages API's thinking
blocks and the Responses API's reasoning item are checked as built from a read reply."""

from __future__ import annotations

import re

import openai
import pytest

from sagellm.gateway.anthropic.replies import MessageEvents, content_blocks
from sagellm.gateway.openai.responses import reasoning_item
from sagellm.gateway.openai.tool_parsers import ToolCall
from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config

pytestmark = [pytest.mark.slow]

SHAPE = r"<think>[a-z]{3,12}</think>[a-z]{2,12}"  # what the regex lets the tiny model say
CHAT = [{"role": "user", "content": "Think, then answer."}]


@pytest.fixture(scope="module")
def client(tiny_model, tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("reasoning"), reasoning_parser="qwen3")
    with running_gateway(GRAPHS / "colocated.yaml", config, tiny_model) as gateway:
        yield openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0), gateway


def test_thinking_is_reasoning_content_whole_and_streamed(client) -> None:
    sdk, gateway = client
    asked = dict(model=gateway.core.model_name, messages=CHAT, max_tokens=64, temperature=0,
                 extra_body={"structured_outputs": {"regex": SHAPE}})  # fmt: skip
    message = sdk.chat.completions.create(**asked).choices[0].message
    thinking, answer = re.fullmatch(r"<think>([a-z]+)</think>([a-z]+)", f"<think>{message.reasoning_content}</think>"
                                    f"{message.content}").groups()  # fmt: skip
    assert message.reasoning_content == thinking and message.content == answer
    chunks = list(sdk.chat.completions.create(**asked, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed_thinking = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    streamed_answer = "".join(d.content or "" for d in deltas)
    assert (streamed_thinking, streamed_answer) == (thinking, answer)


def test_without_thinking_in_the_reply_all_is_content(client) -> None:
    sdk, gateway = client
    reply = sdk.chat.completions.create(model=gateway.core.model_name, messages=CHAT, max_tokens=8, temperature=0,
                                        extra_body={"structured_outputs": {"regex": "[a-z]{3,6}"}})  # fmt: skip
    message = reply.choices[0].message
    assert message.content and getattr(message, "reasoning_content", None) is None


def test_the_messages_and_responses_apis_show_thinking_their_way() -> None:
    call = ToolCall(name="f", arguments='{"a": 1}')
    blocks = content_blocks("I think.", "Answer.", [call])
    assert [b["type"] for b in blocks] == ["thinking", "text", "tool_use"] and blocks[0]["thinking"] == "I think."
    events = MessageEvents("msg_1", "m")
    sent = [*events.start(), *events.thinking("I "), *events.thinking("think."), *events.text("Answer."),
            *events.call(call), *events.finish("tool_use", None, {})]  # fmt: skip
    kinds = [(e.name, e.data.get("index"), (e.data.get("delta") or e.data.get("content_block") or {}).get("type"))
             for e in sent]  # fmt: skip
    assert kinds == [
        ("message_start", None, None), ("ping", None, None),
        ("content_block_start", 0, "thinking"), ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "thinking_delta"), ("content_block_stop", 0, None),
        ("content_block_start", 1, "text"), ("content_block_delta", 1, "text_delta"), ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"), ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 2, None), ("message_delta", None, None), ("message_stop", None, None),
    ]  # fmt: skip
    item = reasoning_item("I think.")
    assert item["type"] == "reasoning" and item["content"] == [{"type": "reasoning_text", "text": "I think."}]
