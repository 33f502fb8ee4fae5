"""One reply read as its text streams in: its thinking, its answer and its tool calls, for every API that shows them
(chat's `reasoning_content` and `tool_calls`, the Responses API's reasoning and function-call items, the Messages
API's `thinking` and `tool_use` blocks).

The reasoning parser splits the text first; each part then goes through a tool-call parser of its own, so a call the
model writes while thinking is a call too (the thinking around it stays thinking), and calls are numbered in the
order they complete. What comes out does not depend on where the stream was cut into deltas: every parser holds back
a tag until it is whole. Text that does not parse (a broken call, an unclosed tag) stays text, never an error."""

from __future__ import annotations

from dataclasses import dataclass

from sagellm.gateway.openai.reasoning_parsers import AnswerEvent, ReasoningEvent, ReasoningParser, parser_class
from sagellm.gateway.openai.tool_parsers import ContentEvent, ToolCall, ToolCallEvent, ToolParser, parser_for

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


@dataclass
class Reply:
    """A whole reply, read."""

    reasoning: str | None
    content: str | None
    calls: list[ToolCall]


class ReplyReader:
    def __init__(self, plan: ReplyPlan) -> None:
        self._reasoning: ReasoningParser | None = None
        if plan.reasoning_parser is not None:
            self._reasoning = parser_class(plan.reasoning_parser)(plan.starts_thinking)
        self._answer_tools: ToolParser | None = None
        self._thinking_tools: ToolParser | None = None
        if plan.tool_parser is not None:
            self._answer_tools, self._thinking_tools = parser_for(plan.tool_parser), parser_for(plan.tool_parser)
        self._calls = 0

    @classmethod
    def whole(cls, plan: ReplyPlan, text: str) -> Reply:
        events = cls(plan).step(text, finished=True)
        reasoning = "".join(e.text for e in events if isinstance(e, ReasoningEvent))
        content = "".join(e.text for e in events if isinstance(e, ContentEvent))
        calls = [e.call for e in events if isinstance(e, ToolCallEvent)]
        return Reply(reasoning or None, content or None, calls)

    def step(self, delta: str, finished: bool) -> list[ReplyEvent]:
        """The events one streamed delta of the reply makes (its text, and whether it is the last)."""
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

    def _numbered(self, events: list[ContentEvent | ToolCallEvent], thinking: bool) -> list[ReplyEvent]:
        out: list[ReplyEvent] = []
        for event in events:
            if isinstance(event, ToolCallEvent):
                out.append(ToolCallEvent(self._calls, event.call))
                self._calls += 1
            else:
                out.append(ReasoningEvent(event.text) if thinking else event)
        return out
