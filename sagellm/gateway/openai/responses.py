"""OpenAI's Responses API (`POST /v1/responses`) read into a chat, and a chat's result written back as a response.

A response request is a chat in other words: `instructions` is the system message, `input` the turns (a string, or
items: messages, the `function_call`s of an earlier response and their `function_call_output`s), `tools` flat
function tools, `text.format` the structured output, `max_output_tokens` the bound. So it takes the chat's whole
path (admission, policy, route, failover, guided decoding, the tool-call parser) and only its two ends are here:
`chat_body` builds the chat, `output_items` / `response_body` and `ResponseEvents` (the typed event stream the SDKs
read) shape what came back. A stored response (`store`, the default) keeps its conversation in memory
(`ResponseStore`, the latest MAX_STORED, readable only by the key that made it), so `previous_response_id` continues
it."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from typing import Any, Literal

import msgspec

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.openai.protocol import ChatCompletionRequest, ChatMessage
from sagellm.gateway.openai.tool_parsers import ToolCall
from sagellm.gateway.openai.tools import Function, FunctionName, NamedFunction, NamedToolChoice, Tool, tool_call_json

MAX_STORED = 1_000  # responses kept for previous_response_id, the oldest forgotten first


class FunctionTool(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    name: FunctionName


class TextFormat(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct, kw_only=True):
    format: TextFormat | None = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    previous_response_id: str | None = None
    store: bool = True
    user: str | None = None
    metadata: dict[str, str] | None = None
    background: bool = False
    reasoning: dict[str, Any] | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def input_messages(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages of a response's `input`: a string is one user message; items are messages (content a
    string or `input_text` / `output_text` parts), `function_call`s (an assistant's calls, consecutive ones in one
    message) and `function_call_output`s (tool messages). A 400 naming the item for anything else."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(value):
        kind = item.get("type", "message")
        where = f"input[{index}]"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise ApiError(400, f"{where}.role: user, system, developer or assistant, got {role!r}", param=where)
            messages.append({"role": role, "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            call = tool_call_json(ToolCall(id=_field(item, "call_id", where), name=_field(item, "name", where),
                                           arguments=_field(item, "arguments", where)))  # fmt: skip
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _text(output, where)
            messages.append({"role": "tool", "tool_call_id": _field(item, "call_id", where), "content": content})
        else:
            raise ApiError.unsupported(where, f"items of type {kind!r} are not supported")
    return messages


def _field(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise ApiError(400, f"{where}.{name}: a string is required, got {value!r}", param=f"{where}.{name}")
    return value


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or its text parts joined (`input_text`, `output_text`, `text`)."""
    if isinstance(content, str):
        return content
    kinds = ("input_text", "output_text", "text")
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") in kinds and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise ApiError.unsupported(f"{where}.content", "text or text parts only")


def chat_body(body: ResponsesRequest, history: list[dict[str, Any]]) -> tuple[ChatCompletionRequest, list[dict]]:
    """The chat a response request is, after the conversation so far (`history`: a stored response's), and the
    conversation it makes (without the instructions, which apply to this response only, as OpenAI's do)."""
    if body.background:
        raise ApiError.unsupported("background", "not supported; send the request and wait for it, or stream it")
    if body.reasoning and body.reasoning.get("effort") not in (None, "none", "minimal"):
        raise ApiError.unsupported("reasoning", "this model does not reason")
    conversation = history + input_messages(body.input)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    tools = [
        Tool(
            type="function",
            function=Function(name=t.name, description=t.description, parameters=t.parameters, strict=t.strict),
        )
        for t in body.tools or []
    ]
    choice = body.tool_choice
    if isinstance(choice, FunctionChoice):
        choice = NamedToolChoice(type="function", function=NamedFunction(name=choice.name))
    chat = ChatCompletionRequest(
        model=body.model,
        messages=msgspec.convert(system + conversation, list[ChatMessage]),
        max_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        user=body.user,
        tools=tools or None,
        tool_choice=choice,
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=_response_format(body.text),
        stream=body.stream,
    )
    return chat, conversation


def _response_format(text: TextConfig | None) -> dict[str, Any] | None:
    form = text.format if text is not None else None
    if form is None or form.type == "text":
        return None
    if form.type == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": form.name or "output", "schema": form.schema}}


def message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id or new_id("msg"),
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def call_item(call: ToolCall, status: str = "completed", arguments: str | None = None) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": "fc_" + call.id.removeprefix("call_"),
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments if arguments is None else arguments,
        "status": status,
    }


def output_items(content: str | None, calls: list[ToolCall]) -> list[dict[str, Any]]:
    """A reply's output items: its text as one message (when it has any), then each call."""
    return ([message_item(content)] if content else []) + [call_item(call) for call in calls]


def conversation_after(conversation: list[dict[str, Any]], content: str | None, calls: list[ToolCall]) -> list[dict]:
    """The conversation with this response's reply added, as the next response in it sees it."""
    reply: dict[str, Any] = {"role": "assistant", "content": content or ""}
    if calls:
        reply["tool_calls"] = [tool_call_json(call) for call in calls]
    return [*conversation, reply]


def response_body(
    response_id: str,
    model: str,
    body: ResponsesRequest,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    finish_reason: str | None,
    created_at: int,
    status: str | None = None,
) -> dict[str, Any]:
    """The `response` object: its status (`completed`, or `incomplete` when cut by max_output_tokens; `status`
    overrides it while it is still `in_progress`), output, usage, and the request's settings, echoed."""
    cut = finish_reason == "length"
    status = status or ("incomplete" if cut else "completed")
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if cut and status == "incomplete" else None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "store": body.store,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "text": {"format": msgspec.to_builtins(form) if (form := body.text and body.text.format) else {"type": "text"}},
        "tool_choice": msgspec.to_builtins(body.tool_choice) if body.tool_choice is not None else "auto",
        "tools": [msgspec.to_builtins(t) for t in body.tools or []],
        "usage": _usage(usage) if usage is not None else None,
        "user": body.user,
        "metadata": body.metadata or {},
    }


def _usage(chat_usage: dict[str, Any]) -> dict[str, Any]:
    """A chat's usage in the Responses API's names."""
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": chat_usage["total_tokens"],
    }


class ResponseStore:
    """Stored responses' conversations by id, the latest MAX_STORED; each readable only by the key that made it
    (another key's id is not found, as `/v1/requests/{id}`)."""

    def __init__(self, limit: int = MAX_STORED) -> None:
        self.limit = limit
        self._kept: OrderedDict[str, tuple[str, list[dict[str, Any]]]] = OrderedDict()

    def conversation(self, response_id: str | None, owner: str) -> list[dict[str, Any]]:
        if response_id is None:
            return []
        kept = self._kept.get(response_id)
        if kept is None or kept[0] != owner:
            message = f"previous_response_id: no stored response {response_id!r} (the latest {self.limit} are kept)"
            raise ApiError(404, message, param="previous_response_id", code="not_found")
        return list(kept[1])

    def keep(self, response_id: str, owner: str, conversation: list[dict[str, Any]]) -> None:
        self._kept[response_id] = (owner, conversation)
        while len(self._kept) > self.limit:
            self._kept.popitem(last=False)


class ResponseEvents:
    """The typed events of a streamed response, numbered (`sequence_number`) as they are made: the response's
    creation, its text as `response.output_text.delta`s of one message item, each call as a function_call item whose
    arguments come in one `response.function_call_arguments.delta`, and `response.completed` (or `.incomplete`)."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot  # the response as created: status in_progress, no output
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self._message: dict[str, Any] | None = None  # the message item being streamed
        self._text = ""

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def start(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self.snapshot),
            self._event("response.in_progress", response=self.snapshot),
        ]

    def text(self, delta: str) -> list[dict[str, Any]]:
        events = []
        if self._message is None:
            self._message = message_item("", status="in_progress")
            self._message["content"] = []
            self.output.append(self._message)
            events.append(self._item_event("response.output_item.added", self._message))
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events.append(self._part_event("response.content_part.added", part))
        self._text += delta
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=self._message["id"],
                output_index=self._index(self._message),
                content_index=0,
                delta=delta,
                logprobs=[],
            )
        )
        return events

    def call(self, call: ToolCall) -> list[dict[str, Any]]:
        events = self._close_message()
        item = call_item(call, status="in_progress", arguments="")
        self.output.append(item)
        index = self._index(item)
        events.append(self._item_event("response.output_item.added", item))
        events.append(
            self._event(
                "response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=call.arguments
            )
        )
        events.append(
            self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=call.arguments,
            )
        )
        item.update(arguments=call.arguments, status="completed")
        events.append(self._item_event("response.output_item.done", item))
        return events

    def finish(self, final: dict[str, Any]) -> list[dict[str, Any]]:
        """The closing events; `final`: the whole response (`response_body`), whose output these events built."""
        events = self._close_message()
        final["output"] = self.output
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return [*events, self._event(kind, response=final)]

    def _close_message(self) -> list[dict[str, Any]]:
        message = self._message
        if message is None:
            return []
        self._message = None
        part = {"type": "output_text", "text": self._text, "annotations": [], "logprobs": []}
        index = self._index(message)
        events = [
            self._event(
                "response.output_text.done",
                item_id=message["id"],
                output_index=index,
                content_index=0,
                text=self._text,
                logprobs=[],
            ),
            self._part_event("response.content_part.done", part, message),
        ]
        message.update(content=[part], status="completed")
        events.append(self._item_event("response.output_item.done", message))
        self._text = ""
        return events

    def _index(self, item: dict[str, Any]) -> int:
        return next(i for i, it in enumerate(self.output) if it is item)

    def _item_event(self, kind: str, item: dict[str, Any]) -> dict[str, Any]:
        return self._event(kind, output_index=self._index(item), item=dict(item))

    def _part_event(self, kind: str, part: dict[str, Any], message: dict[str, Any] | None = None) -> dict[str, Any]:
        message = message or self._message
        assert message is not None
        return self._event(kind, item_id=message["id"], output_index=self._index(message), content_index=0, part=part)


def created_at() -> int:
    return int(time.time())
