"""What reading a reply yields, shared by every reader of it: the reasoning parsers (`reasoning_parsers`), the
tool-call parsers (`tool_parsers`) and the Harmony reader (`harmony`), which yields all three kinds at once. Kept
apart from the parsers so the Harmony reader can be a parser of both registries without importing either."""

from __future__ import annotations

import secrets

import msgspec


class ReasoningEvent(msgspec.Struct, frozen=True):
    """Text of the reply's thinking."""

    text: str


class AnswerEvent(msgspec.Struct, frozen=True):
    """Text of the reply's answer (what follows the thinking), for the tool-call parser and then the client."""

    text: str


def new_call_id() -> str:
    """OpenAI's shape of a tool call id: `call_` and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """One call as OpenAI sends it: `arguments` is the JSON text of the arguments object."""

    id: str = msgspec.field(default_factory=new_call_id)
    name: str
    arguments: str


class ContentEvent(msgspec.Struct, frozen=True):
    """Reply text that belongs to no tool call, to stream to the client as `content`."""

    text: str


class ToolCallEvent(msgspec.Struct, frozen=True):
    """A complete tool call; `index` counts the reply's calls from 0, as the stream's `tool_calls[].index` does."""

    index: int
    call: ToolCall
