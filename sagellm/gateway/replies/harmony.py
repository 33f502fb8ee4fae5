"""OpenAI's Harmony format (gpt-oss) read from a reply as it streams in: its thinking, its answer and its tool calls.

A gpt-oss reply is a run of messages, each `<|start|>{header}<|message|>{content}` ended by `<|end|>`, or by
`<|return|>` (the answer is done) or `<|call|>` (a tool is called), the last two being its end-of-reply tokens. The
prompt ends with `<|start|>assistant`, so the reply opens inside the first header. A header names the message's
channel (`<|channel|>analysis`) and, for a call, its recipient (`to=functions.NAME`, in the channel part or the
role part), and may say its content type (`<|constrain|>json`). The channels map onto the API's parts as vLLM maps
them: `analysis` is the thinking (`reasoning_content`), `final` the answer (`content`), `commentary` without a
recipient a preamble the user is meant to see (`content` too), and a message to `functions.NAME` a tool call whose
content is its JSON arguments. A message to another recipient (gpt-oss's built-in `browser` and `python` tools,
which this server does not run) is the model's own work: thinking.

The markers are special tokens, so the reply's text holds them only when the engine keeps special tokens in it
(the gateway asks so for a reply this reader reads). A marker split across deltas is held back until it is whole,
so what is read does not depend on where the stream was cut; a call is reported whole when its message ends.
Nothing the model writes is an error: a call whose arguments are not a JSON object stays text, as a reply not in
Harmony at all does, and a call when calls are not read (`read_calls` off: the request offered no tools) is text."""

from __future__ import annotations

import json
import re
from typing import Literal

from sagellm.gateway.replies.events import ContentEvent, ReasoningEvent, ToolCall, ToolCallEvent

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CONSTRAIN, RETURN, CALL = "<|constrain|>", "<|return|>", "<|call|>"
# What ends a message's content: its own end markers, or (the end left out) the next message's start
CONTENT_ENDS = (END, RETURN, CALL, START)
FUNCTIONS = "functions."  # the namespace of the request's tools, as the template shows them
_CHANNEL = re.compile(r"<\|channel\|>\s*([^\s<]+)")
_RECIPIENT = re.compile(r"(?:^|\s)to=([^\s<]+)")

HarmonyEvent = ReasoningEvent | ContentEvent | ToolCallEvent
Part = Literal["thinking", "answer", "call"]


class HarmonyReader:
    """Reads one Harmony reply, delta by delta (`step`), into thinking, answer and tool-call events."""

    def __init__(self, read_calls: bool = True) -> None:
        self._read_calls = read_calls
        self._state: Literal["header", "content", "between"] = "header"  # the reply opens inside a header
        self._held = ""  # text not yet read: a header so far, or what may be the start of a marker
        self._part: Part = "answer"  # where the open message's content goes
        self._call_name = ""
        self._arguments: list[str] = []  # the open call's content so far
        self._calls = 0

    @classmethod
    def read(cls, text: str, read_calls: bool = True) -> list[HarmonyEvent]:
        """A whole reply's events."""
        return cls(read_calls).step(text, finished=True)

    def step(self, delta: str, finished: bool) -> list[HarmonyEvent]:
        """The events one streamed delta makes (its text, and whether it is the reply's last)."""
        text, self._held = self._held + delta, ""
        events: list[HarmonyEvent] = []
        while True:
            if self._state == "between":  # after a message's end: the next one's start marker
                stripped = text.lstrip()
                if stripped.startswith(START):
                    text, self._state = stripped[len(START) :], "header"
                    continue
                if not finished and START.startswith(stripped):
                    self._held = text  # nothing, or the start marker's beginning: wait for more
                    break
                text, self._state = stripped, "header"  # a message without its start marker: its header at once
                continue
            if self._state == "header":
                at = text.find(MESSAGE)
                if at < 0:
                    if finished:
                        events += self._unread_header(text)
                    else:
                        self._held = text
                    break
                self._open(text[:at])
                text, self._state = text[at + len(MESSAGE) :], "content"
                continue
            at, marker = _first_marker(text)
            if at < 0:
                keep = 0 if finished else _partial_marker(text)
                events += self._content(text[: len(text) - keep])
                self._held = text[len(text) - keep :]
                if finished:  # the reply ended inside a message (its end token is not text): the message ends too
                    events += self._close()
                break
            events += self._content(text[:at]) + self._close()
            text, self._state = text[at + len(marker) :], "header" if marker == START else "between"
        return events

    def _open(self, header: str) -> None:
        """A message's header read: where its content goes."""
        channel = _CHANNEL.search(header)
        recipient = _RECIPIENT.search(header)
        to = recipient.group(1) if recipient else None
        if to is not None and to.startswith(FUNCTIONS) and self._read_calls:
            self._part, self._call_name = "call", to[len(FUNCTIONS) :]
        elif to is not None and not to.startswith(FUNCTIONS) and to != "assistant":
            self._part = "thinking"  # a built-in tool's call: the model's own work
        else:
            self._part = "thinking" if channel is not None and channel.group(1) == "analysis" else "answer"

    def _content(self, text: str) -> list[HarmonyEvent]:
        if not text:
            return []
        if self._part == "call":
            self._arguments.append(text)
            return []
        return [ReasoningEvent(text) if self._part == "thinking" else ContentEvent(text)]

    def _close(self) -> list[HarmonyEvent]:
        """The open message ended: a call is read whole now (its arguments a JSON object, else it stays text)."""
        if self._part != "call":
            return []
        arguments, self._arguments, self._part = "".join(self._arguments), [], "answer"
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            return [ContentEvent(arguments)] if arguments else []
        self._calls += 1
        call = ToolCall(name=self._call_name, arguments=json.dumps(parsed, ensure_ascii=False))
        return [ToolCallEvent(self._calls - 1, call)]

    @staticmethod
    def _unread_header(text: str) -> list[HarmonyEvent]:
        """A reply that ended inside a header: plain text (a reply not in Harmony) is the answer; a header cut short
        (markers in it) says nothing."""
        return [ContentEvent(text)] if text.strip() and "<|" not in text else []


def _first_marker(text: str) -> tuple[int, str]:
    """Where the first marker that ends a message's content is in `text`, and which (-1 when none is)."""
    found = [(at, marker) for marker in CONTENT_ENDS if (at := text.find(marker)) >= 0]
    return min(found) if found else (-1, "")


def _partial_marker(text: str) -> int:
    """How many of `text`'s last characters could begin a marker that ends content: held until the next delta."""
    for size in range(min(max(map(len, CONTENT_ENDS)) - 1, len(text)), 0, -1):
        if any(marker.startswith(text[-size:]) for marker in CONTENT_ENDS):
            return size
    return 0
