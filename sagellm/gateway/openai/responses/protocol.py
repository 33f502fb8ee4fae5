"""OpenAI's Responses API (`POST /v1/responses`) read into a chat, and a chat's result written back as a response.

A response request is a chat in other words: `instructions` is the system message, `input` the turns (a string, or
items: messages, their `input_image` parts the chat's `image_url` parts (`content.py`), `developer` ones as system
messages as OpenAI reads them for a model without that role, the `function_call`s of an earlier response and their
`function_call_output`s), `tools` function tools
(`tools.py`: a namespace's functions in its place, hosted tools left out), `text.format` the structured
output, `max_output_tokens` the bound. So it takes the chat's whole path (admission, policy, route, failover, guided
decoding, the tool-call parser) and only its two ends are here: `chat_body` builds the chat, `output_items` /
`response_body` and `ResponseEvents` (`events.py`, the typed event stream the SDKs read) shape what came
back. A stored response (`store`, the default) keeps its conversation in memory (`store.py`), so
`previous_response_id` continues it; one with `store: false` is not kept.

What a client like Codex sends along that asks for nothing this server has is taken, not refused: `reasoning` (its
`effort` goes to a model whose template takes one, gpt-oss's; otherwise it is echoed as given and changes nothing;
a reasoning model's thinking is the response's reasoning item either way), `include` values
naming items this server never makes (`reasoning.encrypted_content`), `prompt_cache_key` (every prompt's prefix is
cached here anyway)."""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, Literal

import msgspec

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.http.metadata import Metadata
from sagellm.gateway.openai.chat_completion.protocol import ChatCompletionRequest, ChatMessage
from sagellm.gateway.openai.responses.content import message_content, text_content
from sagellm.gateway.openai.responses.tools import function_tools
from sagellm.gateway.replies.events import ToolCall
from sagellm.gateway.replies.tools import FunctionName, NamedFunction, NamedToolChoice, tool_call_json
from sagellm.runtime.engine.request_limits import MAX_INCLUDE, MAX_MESSAGES, MAX_TOOLS

# `include` values that name items this server never makes (no reasoning, no hosted tools, input images not echoed):
# asking for them adds nothing, as OpenAI's API adds nothing when a response has no such item
INCLUDES_OF_NOTHING = frozenset({
    "reasoning.encrypted_content", "file_search_call.results", "web_search_call.results",
    "web_search_call.action.sources", "code_interpreter_call.outputs", "computer_call_output.output.image_url",
    "message.input_image.image_url",
})  # fmt: skip


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


class Reasoning(msgspec.Struct, kw_only=True, omit_defaults=True):
    """OpenAI's reasoning settings, taken and echoed: `effort` is honoured by a model whose template takes one
    (gpt-oss's), the rest change nothing (`generate_summary`: `summary`'s older name)."""

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed", "none"] | None = None
    generate_summary: Literal["auto", "concise", "detailed", "none"] | None = None


# OpenAI's efforts on the Responses API as a chat's (Harmony's low, medium and high): the scale's ends meet its ends
_CHAT_EFFORT = {"none": "low", "minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "high"}


class ResponsesRequest(msgspec.Struct, kw_only=True):
    """Its lists and maps are capped (`request_limits`): `input` as a chat's messages, `metadata` as OpenAI's."""

    model: str | None = None
    input: str | Annotated[list[dict[str, Any]], msgspec.Meta(max_length=MAX_MESSAGES)]
    instructions: str | None = None
    # read by `tools.function_tools` (which caps the functions namespaces hold too)
    tools: Annotated[list[dict[str, Any]], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None  # a conversation's id (or {"id": ...}): its items go before
    store: bool = True
    user: str | None = None
    metadata: Metadata | None = None
    background: bool = False
    reasoning: Reasoning | None = None
    include: Annotated[list[str], msgspec.Meta(max_length=MAX_INCLUDE)] | None = None
    prompt_cache_key: str | None = None


def conversation_id(body: ResponsesRequest) -> str | None:
    """The conversation a response continues (`conversation`: its id, or an object with one)."""
    given = body.conversation
    if given is None or isinstance(given, str):
        return given
    if not isinstance(given.get("id"), str):
        raise ApiError(400, 'conversation: a conversation\'s id, or an object {"id": ...}', param="conversation")
    return given["id"]


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def input_messages(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages of a response's `input`: a string is one user message; items are messages (content a
    string, or text and image parts: `content.py`), `function_call`s (an assistant's calls, consecutive ones in one
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
            role = "system" if role == "developer" else role  # OpenAI's reading of it for models without the role
            messages.append({"role": role, "content": message_content(item.get("content"), where)})
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
            content = output if isinstance(output, str) else text_content(output, where)
            messages.append({"role": "tool", "tool_call_id": _field(item, "call_id", where), "content": content})
        else:
            raise ApiError.unsupported(where, f"items of type {kind!r} are not supported")
    return messages


def _field(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise ApiError(400, f"{where}.{name}: a string is required, got {value!r}", param=f"{where}.{name}")
    return value


def chat_body(
    body: ResponsesRequest, history: list[dict[str, Any]]
) -> tuple[ChatCompletionRequest, list[dict], dict[str, str]]:
    """The chat a response request is, after the conversation so far (`history`: a stored response's), the
    conversation it makes (without the instructions, which apply to this response only, as OpenAI's do), and the
    namespace of each function a namespace tool held (its calls carry it)."""
    if body.background and not body.store:
        raise ApiError(400, "store: a background response is stored (store: true), to be read back", param="store")
    _check_include(body.include)
    conversation = history + input_messages(body.input)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    functions = function_tools(body.tools)
    choice = body.tool_choice
    if isinstance(choice, FunctionChoice):
        choice = NamedToolChoice(type="function", function=NamedFunction(name=choice.name))
    elif body.tools and not functions.tools:  # every tool was one this server cannot run
        if choice == "required":
            message = "tool_choice: required, but no tool is a function this server runs"
            raise ApiError(400, message, param="tool_choice")
        choice = None
    try:  # (consecutive calls are one assistant message, which holds at most MAX_TOOL_CALLS)
        messages = msgspec.convert(system + conversation, list[ChatMessage])
    except msgspec.ValidationError as error:
        raise ApiError(400, f"input: {error}", param="input", code="invalid_request") from None
    chat = ChatCompletionRequest(
        model=body.model,
        messages=messages,
        max_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        user=body.user,
        tools=functions.tools or None,
        tool_choice=choice,
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=_response_format(body.text),
        stream=body.stream,
    )
    return chat, conversation, functions.namespaces


def reasoning_effort(reasoning: Reasoning | None) -> Any:
    """A response's `reasoning.effort` as its chat's `reasoning_effort`, for a model that honours one (None: none
    asked)."""
    effort = reasoning.effort if reasoning is not None else None
    return _CHAT_EFFORT[effort] if effort is not None else None


def refuse_include(query: dict[str, str]) -> None:
    """An item list's `include` (the SDKs send `include[]`): items are kept as they were given, with nothing more to
    add, so asking for more is a 400 rather than a silent no."""
    if "include" in query or "include[]" in query:
        raise ApiError.unsupported("include", "items are kept as they were given; nothing more to include")


def _check_include(include: list[str] | None) -> None:
    """`include`: values naming items this server never makes are taken; logprobs, which it could make but does
    not here, and unknown values are a 400 naming the value."""
    for index, value in enumerate(include or []):
        if value == "message.output_text.logprobs":
            raise ApiError.unsupported(f"include[{index}]", "output text logprobs are not served on this API")
        if value not in INCLUDES_OF_NOTHING:
            known = ", ".join(sorted(INCLUDES_OF_NOTHING))
            message = f"include[{index}]: unknown value {value!r} (known: {known})"
            raise ApiError(400, message, param=f"include[{index}]")


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


def call_item(
    call: ToolCall, status: str = "completed", arguments: str | None = None, namespace: str | None = None
) -> dict[str, Any]:
    """A call as a `function_call` item; a function a namespace tool held names it (`namespace`), as clients that
    key their tools by namespace and name look it up."""
    item = {
        "type": "function_call",
        "id": "fc_" + call.id.removeprefix("call_"),
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments if arguments is None else arguments,
        "status": status,
    }
    return item if namespace is None else {**item, "namespace": namespace}


def reasoning_item(text: str) -> dict[str, Any]:
    """A reply's thinking as the Responses API's reasoning item (its text whole; no summary is made)."""
    return {"type": "reasoning", "id": new_id("rs"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": "completed"}  # fmt: skip


def output_items(content: str | None, calls: list[ToolCall], namespaces: dict[str, str]) -> list[dict[str, Any]]:
    """A reply's output items: its text as one message (when it has any), then each call."""
    calls_out = [call_item(call, namespace=namespaces.get(call.name)) for call in calls]
    return ([message_item(content)] if content else []) + calls_out


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
    error: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The `response` object: its status (`completed`, or `incomplete` when cut by max_output_tokens; `status`
    overrides it: `in_progress` while it runs, `failed` with its `error`), output, usage, and the request's
    settings, echoed."""
    cut = finish_reason == "length"
    status = status or ("incomplete" if cut else "completed")
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if cut and status == "incomplete" else None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "conversation": {"id": conversation_id(body)} if body.conversation is not None else None,
        "store": body.store,
        "background": body.background,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "text": {"format": msgspec.to_builtins(form) if (form := body.text and body.text.format) else {"type": "text"}},
        "tool_choice": msgspec.to_builtins(body.tool_choice) if body.tool_choice is not None else "auto",
        "tools": body.tools or [],
        "reasoning": msgspec.to_builtins(body.reasoning) if body.reasoning else {"effort": None, "summary": None},
        "prompt_cache_key": body.prompt_cache_key,
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


def created_at() -> int:
    return int(time.time())
