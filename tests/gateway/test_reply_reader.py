"""A reply read into thinking, answer and tool calls (`ReplyReader`): the same whatever the deltas it streamed in,
cut at every position and one character at a time, with calls made while thinking, after it and broken ones."""

from __future__ import annotations

import json

import pytest

from sagellm.gateway.replies.reader import Reply, ReplyPlan, ReplyReader
from sagellm.gateway.replies.reasoning_parsers import ReasoningParser, default_parser, starts_inside
from sagellm.gateway.replies.tool_parsers import ContentEvent, ToolCallEvent
from tests.tiny_models import make_tokenizer

CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
# (reply, starts inside the thinking, reads tool calls, expected (thinking, answer, names of the calls))
CASES = {
    "qwen3 thinks then answers": ("<think>\nTwo and two.\n</think>\n\nIt is 4.", False, False,
                                  ("\nTwo and two.\n", "It is 4.", [])),
    "deepseek_r1 opened in the prompt": ("Hmm, 2+2.</think>4", True, False, ("Hmm, 2+2.", "4", [])),
    "no thinking at all": ("Just an answer.", False, False, (None, "Just an answer.", [])),
    "thinking never closes": ("<think>still thinking", False, False, ("still thinking", None, [])),
    "a late tag is text": ("Hi <think>no</think>", False, False, (None, "Hi <think>no</think>", [])),
    "a call after thinking": (f"<think>I should call.</think>\n{CALL}", False, True,
                              ("I should call.", None, ["get_weather"])),
    "a call while thinking": (f"<think>call it {CALL} then</think>done", False, True,
                              ("call it  then", "done", ["get_weather"])),
    "a closing tag inside an argument": ('<tool_call>{"name": "get_weather", "arguments": {"city": "x</tool_call>y"}}'
                                         '</tool_call>', False, True, (None, None, ["get_weather"])),
    "a broken call stays text": ("<think>x</think><tool_call>{not json</tool_call>", False, True,
                                 ("x", "<tool_call>{not json</tool_call>", [])),
}  # fmt: skip


def _seen(reply: Reply) -> tuple:
    """A reply as the client sees it, but the calls' random ids."""
    return reply.reasoning, reply.content, [(c.name, c.arguments) for c in reply.calls]


def _read(chunks: list[str], plan: ReplyPlan) -> tuple:
    reader = ReplyReader(plan)
    events = [e for i, chunk in enumerate(chunks) for e in reader.step(chunk, i == len(chunks) - 1)]
    thinking = "".join(e.text for e in events if type(e).__name__ == "ReasoningEvent")
    answer = "".join(e.text for e in events if isinstance(e, ContentEvent))
    calls = [e for e in events if isinstance(e, ToolCallEvent)]
    assert [c.index for c in calls] == list(range(len(calls)))
    seen = _seen(Reply(thinking or None, answer or None, [c.call for c in calls]))
    assert _seen(reader.reply) == seen  # what the reader kept is what it told
    return seen


@pytest.mark.parametrize("case", list(CASES))
def test_the_reading_does_not_depend_on_where_the_stream_was_cut(case: str) -> None:
    text, inside, tools, (thinking, answer, names) = CASES[case]
    plan = ReplyPlan(tool_parser="hermes" if tools else None, reasoning_parser="qwen3", starts_thinking=inside)
    whole = ReplyReader.whole(plan, text)
    assert (whole.reasoning, whole.content, [c.name for c in whole.calls]) == (thinking, answer, names)
    for cut in range(len(text) + 1):
        assert _read([text[:cut], text[cut:]], plan) == _seen(whole), cut
    assert _read(list(text), plan) == _seen(whole)
    for call in whole.calls:
        assert json.loads(call.arguments)["city"] in ("Paris", "x</tool_call>y")


def test_without_a_reasoning_parser_the_think_tags_are_text() -> None:
    plan = ReplyPlan(tool_parser="hermes")
    assert ReplyReader.whole(plan, f"<think>a</think>{CALL}").content == "<think>a</think>"


def test_where_a_reply_starts_is_read_off_the_rendered_generation_prompt() -> None:
    tokenizer = make_tokenizer()
    opens = "{% for m in messages %}{{ m.content }}{% endfor %}<|im_start|>assistant\n<think>\n"
    qwen3 = ("{% for m in messages %}{{ m.content }}{% endfor %}<|im_start|>assistant\n{% if enable_thinking is "
             "defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}")  # fmt: skip
    assert starts_inside(tokenizer, opens, None)
    assert not starts_inside(tokenizer, qwen3, None)
    assert not starts_inside(tokenizer, qwen3, {"enable_thinking": False})  # closed by the template itself
    assert default_parser(qwen3) == "qwen3" and default_parser(tokenizer.chat_template) is None
    assert ReasoningParser.split("a</think>b", inside=True) == ("a", "b")
