"""One reply read as its text streams in: its thinking, its answer and its tool calls, for every API that shows them
(chat's `reasoning_content` and `tool_calls`, the Responses API's reasoning and function-call items, the Messages
API's `thinking` and `tool_use` blocks).

A gpt-oss reply (Harmony) carries its thinking, its answer and its calls in one stream of channels, so a plan that
names either Harmony parser (`openai_gptoss`, `openai`) reads it with one Harmony reader (`harmony.py`), calls read
when the plan reads calls. Any other reply is read in two layers: the reasoning parser splits the text first; each
part then goes through a tool-call parser of its own, so a call the model writes while thinking is a call too (the
thinking around it stays thinking). Calls are numbered in the order they complete. What comes out does not depend on
where the stream was cut into deltas: every parser holds back a tag until it is whole. Text that does not parse (a
broken call, an unclosed tag) stays text, never an error."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sagellm.gateway.replies.events import AnswerEvent, ContentEvent, ReasoningEvent, ToolCall, ToolCallEvent
from sagellm.gateway.replies.harmony import HarmonyReader
from sagellm.gateway.replies.reasoning_parsers import GptOssParser, ReasoningParser, parser_class
from sagellm.gateway.replies.tool_parsers import OpenAIParser, ToolParser, parser_for

ReplyEvent = ReasoningEvent | ContentEvent | ToolCallEvent


@dataclass(frozen=True)
class ReplyPlan:
    """How a request's reply is read: its tool-call parser and its reasoning parser (names; None: not read so), and
    whether the reply starts inside the thinking."""

    tool_parser: str | None = None
    reasoning_parser: str | None = None
    starts_thinking: bool = False

    @property
    def reads(self) -> bool:
        return self.tool_parser is not None or self.reasoning_parser is not None

    @property
    def harmony(self) -> bool:
        """The reply is gpt-oss's Harmony: one reader reads it all, and its markers (special tokens) must be kept in
        its text for it."""
        return self.reasoning_parser == GptOssParser.name or self.tool_parser == OpenAIParser.name


@dataclass
class Reply:
    """A whole reply, read."""

    reasoning: str | None
    content: str | None
    calls: list[ToolCall]


class ReplyEvents(Protocol):
    """An API's stream events for a reply's parts (the Messages API's blocks, the Responses API's items)."""

    def thinking(self, text: str) -> list[Any]: ...
    def text(self, text: str) -> list[Any]: ...
    def call(self, call: ToolCall) -> list[Any]: ...


def rendered(events: list[ReplyEvent], into: ReplyEvents) -> list[Any]:
    """The stream events `into` makes of a delta's read events."""
    out: list[Any] = []
    for event in events:
        if isinstance(event, ToolCallEvent):
            out += into.call(event.call)
        elif event.text:
            out += into.thinking(event.text) if isinstance(event, ReasoningEvent) else into.text(event.text)
    return out


class ReplyReader:
    """Reads one reply (`step` each delta) and keeps what it read so far (`reply`)."""

    def __init__(self, plan: ReplyPlan) -> None:
        self._harmony = HarmonyReader(read_calls=plan.tool_parser is not None) if plan.harmony else None
        self._reasoning: ReasoningParser | None = None
        if plan.reasoning_parser is not None and self._harmony is None:
            self._reasoning = parser_class(plan.reasoning_parser)(plan.starts_thinking)
        self._answer_tools: ToolParser | None = None
        self._thinking_tools: ToolParser | None = None
        if plan.tool_parser is not None and self._harmony is None:
            self._answer_tools, self._thinking_tools = parser_for(plan.tool_parser), parser_for(plan.tool_parser)
        self._thinking: list[str] = []
        self._content: list[str] = []
        self._read_calls: list[ToolCall] = []

    @classmethod
    def whole(cls, plan: ReplyPlan, text: str) -> Reply:
        reader = cls(plan)
        reader.step(text, finished=True)
        return reader.reply

    @property
    def reply(self) -> Reply:
        """The reply as read so far."""
        return Reply("".join(self._thinking) or None, "".join(self._content) or None, list(self._read_calls))

    def step(self, delta: str, finished: bool) -> list[ReplyEvent]:
        """The events one streamed delta of the reply makes (its text, and whether it is the last)."""
        events = self._read(delta, finished)
        for event in events:
            if not isinstance(event, ToolCallEvent):
                (self._thinking if isinstance(event, ReasoningEvent) else self._content).append(event.text)
        return events

    def _read(self, delta: str, finished: bool) -> list[ReplyEvent]:
        if self._harmony is not None:
            return self._numbered(self._harmony.step(delta, finished), thinking=False)
        if self._reasoning is None:
            parts: list[ReasoningEvent | AnswerEvent] = [AnswerEvent(delta)] if delta else []
        else:
            parts = self._reasoning.step(delta, finished)
        events: list[ReplyEvent] = []
        for part in parts:
            events += self._tools(part)
        if finished:
            events += self._finish()
        return events

    def _tools(self, part: ReasoningEvent | AnswerEvent) -> list[ReplyEvent]:
        thinking = isinstance(part, ReasoningEvent)
        parser = self._thinking_tools if thinking else self._answer_tools
        if parser is None:
            return [part if thinking else ContentEvent(part.text)]
        return self._numbered(parser.feed(part.text), thinking)

    def _finish(self) -> list[ReplyEvent]:
        events: list[ReplyEvent] = []
        for parser, thinking in ((self._thinking_tools, True), (self._answer_tools, False)):
            if parser is not None:
                events += self._numbered(parser.finish(), thinking)
        return events

    def _numbered(self, events: Sequence[ReplyEvent], thinking: bool) -> list[ReplyEvent]:
        """Calls numbered across the reply, in the order they complete; content read in the thinking is thinking."""
        out: list[ReplyEvent] = []
        for event in events:
            if isinstance(event, ToolCallEvent):
                out.append(ToolCallEvent(len(self._read_calls), event.call))
                self._read_calls.append(event.call)
            else:
                out.append(ReasoningEvent(event.text) if thinking else event)
        return out
