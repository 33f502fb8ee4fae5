"""A reasoning model's replies through the gateway: its thinking read out of the reply as `reasoning_content` (whole
and streamed, the stream's parts adding up to the whole), apart from the answer; with `--reasoning-parser` on a tiny
model whose output a regex forces into `<think>...</think>answer`, so the split is known. A thinking budget
(`thinking_token_budget`, the Messages API's `budget_tokens`) on a model whose template opens the thinking in the
prompt: the thinking is closed after the budget and an answer follows. The Messages API's thinking blocks and the
Responses API's reasoning item are checked as built from a read reply."""

from __future__ import annotations

import re

import anthropic
import httpx
import openai
import pytest
from transformers import AutoTokenizer

from sagellm.gateway.anthropic.replies import MessageEvents, content_blocks
from sagellm.gateway.openai.responses.protocol import reasoning_item
from sagellm.gateway.replies.tool_parsers import ToolCall
from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config
from tests.tiny_models import CHAT_TEMPLATE, make_tiny_llama

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


@pytest.fixture(scope="module")
def r1_model(tmp_path_factory):
    """A tiny model whose template opens the thinking in the generation prompt (as DeepSeek-R1's)."""
    model = make_tiny_llama(tmp_path_factory.mktemp("r1") / "tiny-r1")
    tokenizer = AutoTokenizer.from_pretrained(model)
    opening = "'<|im_start|>assistant\\n'"
    tokenizer.chat_template = CHAT_TEMPLATE.replace(opening, opening[:-1] + "<think>\\n'")
    assert tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True).endswith("<think>\n")
    tokenizer.save_pretrained(model)
    return model


@pytest.fixture(scope="module")
def opens_thinking(r1_model, tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("r1-gw"), reasoning_parser="deepseek_r1")
    with running_gateway(GRAPHS / "colocated.yaml", config, r1_model) as gateway:
        yield gateway


def test_a_thinking_budget_closes_the_thinking_and_the_answer_follows(opens_thinking) -> None:
    gateway = opens_thinking
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    asked = dict(model=gateway.core.model_name, messages=CHAT, max_tokens=24, temperature=0,
                 extra_body={"ignore_eos": True})  # fmt: skip
    unbounded = sdk.chat.completions.create(**asked).choices[0].message
    assert unbounded.reasoning_content and unbounded.content is None  # it never closes its thinking by itself
    extra = asked.pop("extra_body")  # (popped first: the body spells out what the SDK sends, not its own argument)
    body = {**asked, **extra, "thinking_token_budget": 4, "return_token_ids": True}
    reply = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    closing = httpx.post(gateway.url + "/tokenize", json={"prompt": "\n</think>\n\n", "add_special_tokens": False},
                         timeout=30).json()["tokens"]  # fmt: skip
    assert choice["token_ids"][4 : 4 + len(closing)] == closing  # 4 tokens thought, then the forced closing
    assert choice["message"]["content"] and choice["message"]["reasoning_content"]
    messages = anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0)
    reply = messages.messages.create(model=gateway.core.model_name, max_tokens=24, messages=CHAT,
                                     thinking={"type": "enabled", "budget_tokens": 4},
                                     extra_body={"temperature": 0, "ignore_eos": True})  # fmt: skip
    assert [block.type for block in reply.content] == ["thinking", "text"]


def test_the_servers_reasoning_budget_bounds_requests_that_set_none(r1_model, tmp_path) -> None:
    """llama.cpp's --reasoning-budget: every request without a budget of its own thinks at most that many tokens."""
    config = tiny_config(tmp_path, reasoning_parser="deepseek_r1", reasoning_budget=2)
    with running_gateway(GRAPHS / "colocated.yaml", config, r1_model) as gateway:
        body = {"messages": CHAT, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        choice = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]
        closing = httpx.post(gateway.url + "/tokenize", json={"prompt": "\n</think>\n\n", "add_special_tokens": False},
                             timeout=30).json()["tokens"]  # fmt: skip
        assert choice["token_ids"][2 : 2 + len(closing)] == closing and choice["message"]["content"]
