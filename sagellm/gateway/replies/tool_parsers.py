"""Tool parsers: the function calls a model wrote in its reply, read back into OpenAI's `tool_calls`.

A model asked to call tools answers in its own text format, which vLLM's `--tool-call-parser` names: `hermes`
(Qwen2.5/Qwen3, Hermes and ChatML models: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, with
text around them) and `llama3_json` (Llama 3.1/3.2: the whole reply is `{"name": ..., "parameters": {...}}` objects
joined by `;`, after an optional `<|python_tag|>`), and `openai` (gpt-oss: Harmony's messages to `functions.NAME`,
read by `harmony.py`). A parser never raises on what the model wrote: a call it cannot
read stays in the reply as content, which is what vLLM does and what tells the user what went wrong.

A parser serves one reply. Streamed, it is fed the text deltas as they are generated and answers with events:
content that surely belongs to no call, at once, and each call whole once it is complete (its closing tag, or for
`llama3_json` the end of the reply). Whole calls, rather than argument fragments as vLLM streams them, keep the
parser small, and a client joining fragments sees the same call. Whole-reply `parse` is the stream fed all at once,
so the two agree by construction. Content is stripped of the whitespace at its ends, streamed or not: leading
whitespace is dropped, whitespace is held back until more content follows it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from sagellm.common.registry import Registry
from sagellm.gateway.replies.events import ContentEvent, ToolCall, ToolCallEvent
from sagellm.gateway.replies.harmony import CHANNEL, HarmonyEvent, HarmonyReader

StreamEvent = ContentEvent | ToolCallEvent


def read_call(obj: Any) -> ToolCall | None:
    """The call a decoded JSON object stands for: a string `name` and an `arguments` (or Llama's `parameters`)
    object, also given as a JSON string of one. None for anything else, which stays content."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = obj.get("arguments", obj.get("parameters"))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name=obj["name"], arguments=json.dumps(arguments, ensure_ascii=False))


class ToolParser:
    """Reads one reply's tool calls, streamed (`feed` each delta, then `finish`) or whole (`parse`).

    A subclass says its `name` and turns text into events in `feed` and `finish`, reporting content through
    `_content` (which strips the reply's ends) and calls through `_call` (which numbers them)."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self._started = False  # whether content has been sent: whitespace before it is dropped
        self._held_space = ""  # whitespace after the content sent so far, sent only if more content follows
        self._calls = 0

    @classmethod
    def parse(cls, text: str) -> tuple[str | None, list[ToolCall]]:
        """A whole reply's content (None when there is none) and its calls, in order."""
        events = cls().step(text, finished=True)
        content = "".join(event.text for event in events if isinstance(event, ContentEvent))
        return content or None, [event.call for event in events if isinstance(event, ToolCallEvent)]

    def step(self, delta: str, finished: bool) -> list[StreamEvent]:
        """The events of one streamed delta of the reply (its text, and whether it is the last)."""
        return (self.feed(delta) if delta else []) + (self.finish() if finished else [])

    def feed(self, delta: str) -> list[StreamEvent]:
        """The events the reply's next text completes; text that may still turn out to be a call is held back."""
        raise NotImplementedError

    def finish(self) -> list[StreamEvent]:
        """The events of the text still held at the end of the reply."""
        raise NotImplementedError

    def _content(self, text: str) -> list[StreamEvent]:
        if not self._started:
            text = text.lstrip()
        body = text.rstrip()
        if not body:
            self._held_space += text
            return []
        event = ContentEvent(self._held_space + body)
        self._started, self._held_space = True, text[len(body) :]
        return [event]

    def _call(self, call: ToolCall) -> list[StreamEvent]:
        self._calls += 1
        return [ToolCallEvent(self._calls - 1, call)]


TOOL_PARSERS: Registry[type[ToolParser]] = Registry("tool parser")


@TOOL_PARSERS.register
class HermesParser(ToolParser):
    """`<tool_call>{json}</tool_call>` blocks among text. A block whose JSON is not a call stays content, tags and
    all; a block the reply ends inside (the model stopped at its end-of-turn token) is a call if its JSON reads. A
    closing tag inside a string of the JSON is the string's text, not the block's end: an argument may say anything
    its schema allows."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._buffer = ""  # unsent text: a possible start of OPEN, or the inside of an open block
        self._inside = False

    def feed(self, delta: str) -> list[StreamEvent]:
        self._buffer += delta
        events: list[StreamEvent] = []
        while True:
            tag = self.CLOSE if self._inside else self.OPEN
            at = self._close_at() if self._inside else self._buffer.find(tag)
            if at < 0:
                break
            before, self._buffer = self._buffer[:at], self._buffer[at + len(tag) :]
            events += self._block(before) if self._inside else self._content(before)
            self._inside = not self._inside
        if not self._inside:
            keep = _partial_tag_length(self._buffer, self.OPEN)
            events += self._content(self._buffer[: len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep :]
        return events

    def finish(self) -> list[StreamEvent]:
        text, self._buffer = self._buffer, ""
        if not self._inside:
            return self._content(text)
        call = _read_json_call(text)
        return self._call(call) if call else self._content(self.OPEN + text)

    def _close_at(self) -> int:
        """Where the open block's closing tag is: the first one not inside a JSON string of the block."""
        at = self._buffer.find(self.CLOSE)
        while at >= 0 and _in_json_string(self._buffer[:at]):
            at = self._buffer.find(self.CLOSE, at + len(self.CLOSE))
        return at

    def _block(self, inside: str) -> list[StreamEvent]:
        call = _read_json_call(inside)
        return self._call(call) if call else self._content(self.OPEN + inside + self.CLOSE)


@TOOL_PARSERS.register
class Llama3JsonParser(ToolParser):
    """A reply that is nothing but calls: JSON objects joined by `;`, after an optional `<|python_tag|>`. A reply
    that starts otherwise is content and streams as it comes; one that starts like a call is held to its end, then
    read whole: all calls, or (any part not a call) all content, as vLLM reads it."""

    name = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self._held = ""
        self._mode = "undecided"  # "content" streams through; "calls" holds everything to the end

    def feed(self, delta: str) -> list[StreamEvent]:
        if self._mode == "content":
            return self._content(delta)
        self._held += delta
        if self._mode == "undecided":
            start = self._held.lstrip()
            if start.startswith(("{", self.PYTHON_TAG)):
                self._mode = "calls"
            elif start and not self.PYTHON_TAG.startswith(start):
                self._mode, text, self._held = "content", self._held, ""
                return self._content(text)
        return []

    def finish(self) -> list[StreamEvent]:
        text, self._held = self._held, ""
        calls = _read_call_list(text.strip().removeprefix(self.PYTHON_TAG)) if self._mode == "calls" else None
        if calls is None:
            return self._content(text)
        return [event for call in calls for event in self._call(call)]


@TOOL_PARSERS.register
class OpenAIParser(ToolParser):
    """gpt-oss's calls (vLLM's `openai`): Harmony messages to `functions.NAME` whose content is the arguments' JSON
    (`harmony.py`). The final and commentary channels' text is content, exactly as written; the analysis channel's
    is the reasoning parser's and left out here."""

    name = "openai"

    def __init__(self) -> None:
        super().__init__()
        self._reader = HarmonyReader(read_calls=True)

    def feed(self, delta: str) -> list[StreamEvent]:
        return self._events(self._reader.step(delta, finished=False))

    def finish(self) -> list[StreamEvent]:
        return self._events(self._reader.step("", finished=True))

    def _events(self, events: list[HarmonyEvent]) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        for event in events:
            if isinstance(event, ToolCallEvent):
                out += self._call(event.call)
            elif isinstance(event, ContentEvent):
                out.append(event)
        return out


def _in_json_string(text: str) -> bool:
    """Whether JSON text stops inside a string: a tag there is the string's text (outside strings JSON has no `<`)."""
    in_string, escaped = False, False
    for char in text:
        if escaped:
            escaped = False
        elif in_string and char == "\\":
            escaped = True
        elif char == '"':
            in_string = not in_string
    return in_string


def _read_json_call(text: str) -> ToolCall | None:
    try:
        return read_call(json.loads(text))
    except json.JSONDecodeError:
        return None


def _read_call_list(text: str) -> list[ToolCall] | None:
    """`{call}; {call}; ...` (an optional `;` after the last); None unless every part is a call."""
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    at = 0
    while True:
        at = _skip_space(text, at)
        try:
            obj, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return None
        call = read_call(obj)
        if call is None:
            return None
        calls.append(call)
        at = _skip_space(text, at)
        if at < len(text) and text[at] == ";":
            at = _skip_space(text, at + 1)
        if at == len(text):
            return calls


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


def _partial_tag_length(text: str, tag: str) -> int:
    """How long the end of `text` that could be the start of `tag` is (0 if none), to hold back until it is told."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


def parser_for(name: str) -> ToolParser:
    """A new parser for one reply, by its `--tool-call-parser` name; an unknown name is a RegistryError (an
    InvalidInput, so a ValueError) that lists the known ones."""
    return TOOL_PARSERS.get(name)()


def default_parser(chat_template: str | None, model_type: str | None = None) -> str:
    """The parser a model's chat template says its tool calls need. A template that writes Harmony's channels is
    gpt-oss's (`openai`); one that writes `<tool_call>` is Hermes; one with Llama 3's header or python tags is
    `llama3_json`; ChatML is Hermes too (Qwen's, and our fallback template's). `model_type` decides only a template
    without these marks (Llama 3.2 Vision is `mllama`)."""
    template = chat_template or ""
    if CHANNEL in template:
        return OpenAIParser.name
    if "<tool_call>" in template:
        return "hermes"
    if "<|start_header_id|>" in template or "<|python_tag|>" in template:
        return "llama3_json"
    if "<|im_start|>" in template:
        return "hermes"
    return "llama3_json" if model_type == "mllama" else "hermes"


# The chat template to render tools with when the model's own template ignores them (SmolLM2's is plain ChatML): ChatML
# with Hermes-style tools, which the `hermes` parser reads back. Package data: read here, so a wheel without it fails
# at import rather than at a chat's first tool.
FALLBACK_TEMPLATE = Path(__file__).with_name("tool_template.jinja").read_text(encoding="utf-8")
# How the calls of a model another server serves come back: that server returns them structured, and `remote_engine`
# writes each one whole into the reply's text as a Hermes block (`<tool_call>{"name", "arguments"}</tool_call>`).
FORWARDED_CALLS = "hermes"
