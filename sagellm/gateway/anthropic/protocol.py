"""A Messages API request, and the OpenAI chat it is.

Content blocks map onto chat messages: text blocks join into a message's text; an assistant's `tool_use` blocks are
its `tool_calls`; a user's `tool_result` blocks are `tool` messages (answering the call by its id) ahead of the
user's own text; `thinking` blocks of earlier turns are left out of the prompt, as Anthropic's API leaves them; a
`system` message in the middle of the conversation stays a system message there. Tools are functions with their
`input_schema`; `tool_choice` `any` and `tool` force a call, enforced by guided decoding. `output_config.format`
(structured output: what the SDK's `messages.parse` sends) is the chat's `response_format` JSON schema, so the reply's
text follows it by guided decoding. Fields that ask the engine for nothing it has (`cache_control` on blocks,
`context_management`, `output_config.effort`, `service_tier`, betas) are accepted without effect. A user's `image`
blocks are the chat's `image_url` parts, in place among its text blocks (a `base64` source as a data: URL, a `url`
source as its URL, fetched under the same policy); a refusal of one names the block (`images_named`). Documents, and
images anywhere but a user message's content, are refused by name. Lists are capped as the chat's
(`request_limits`), named by this API's field names."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec
import structlog

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.openai.chat_completion.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ContentParts,
    image_part,
)
from sagellm.gateway.replies.tools import NamedFunction, NamedToolChoice, Tool, ToolChoice
from sagellm.runtime.engine.request_limits import (
    MAX_MESSAGES,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOOL_CALLS,
    MAX_TOOLS,
)

log = structlog.get_logger("sagellm.gateway")


class Message(msgspec.Struct, kw_only=True):
    role: Literal["user", "assistant", "system"]
    content: str | ContentParts


Messages = Annotated[list[Message], msgspec.Meta(max_length=MAX_MESSAGES)]
Tools = Annotated[list[dict[str, Any]], msgspec.Meta(max_length=MAX_TOOLS)]
StopSequence = Annotated[str, msgspec.Meta(max_length=MAX_STOP_CHARS)]


class MessagesRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: Messages
    max_tokens: int
    system: str | ContentParts | None = None
    stop_sequences: Annotated[list[StopSequence], msgspec.Meta(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    metadata: dict[str, Any] | None = None
    tools: Tools | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None


class CountTokensRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: Messages
    system: str | ContentParts | None = None
    tools: Tools | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


def chat_body(body: MessagesRequest | CountTokensRequest, model: str | None) -> ChatCompletionRequest:
    """The chat a message request is; `model`: the served name it runs on (None: the gateway's own)."""
    budget = _thinking_budget(body.thinking)
    messages = _system(body.system) + [m for i, message in enumerate(body.messages) for m in _messages(message, i)]
    tools = _tools(body.tools)
    choice, parallel = _tool_choice(body.tool_choice)
    disabled = body.thinking is not None and body.thinking.get("type") == "disabled"
    common: dict[str, Any] = dict(
        model=model,
        messages=msgspec.convert(messages, list[ChatMessage]),
        tools=tools or None,
        tool_choice=choice if tools else None,
        parallel_tool_calls=parallel,
        chat_template_kwargs={"enable_thinking": False} if disabled else None,
        thinking_token_budget=budget,
    )
    if isinstance(body, CountTokensRequest):
        return ChatCompletionRequest(**common)
    if body.max_tokens < 1:
        raise ApiError(400, f"max_tokens: must be at least 1, got {body.max_tokens}", param="max_tokens")
    user = (body.metadata or {}).get("user_id")
    return ChatCompletionRequest(
        **common,
        max_tokens=body.max_tokens,
        stop=body.stop_sequences or None,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        user=user if isinstance(user, str) else None,
        stream=body.stream,
        response_format=_response_format(body.output_config),
    )


def _response_format(output_config: dict[str, Any] | None) -> dict[str, Any] | None:
    """`output_config.format`, `{"type": "json_schema", "schema": {...}}`, as the chat's `response_format` (None
    without one); `effort` asks nothing of this engine. A 400 naming the field for another shape."""
    form = (output_config or {}).get("format")
    if form is None:
        return None
    if not isinstance(form, dict) or form.get("type") != "json_schema" or not isinstance(form.get("schema"), dict):
        message = 'output_config.format: {"type": "json_schema", "schema": {...}} is the format this API takes'
        raise ApiError(400, message, param="output_config.format")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": form["schema"]}}


def _thinking_budget(thinking: dict[str, Any] | None) -> int | None:
    """`enabled`'s `budget_tokens`, the engine's thinking budget; None for `adaptive`, `disabled` or none."""
    if thinking is None or thinking.get("type") in ("adaptive", "disabled"):
        return None
    budget = thinking.get("budget_tokens")
    if thinking.get("type") != "enabled" or not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ApiError(400, "thinking: adaptive, disabled, or enabled with budget_tokens >= 1", param="thinking")
    return budget


def _system(system: str | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    if system is None:
        return []
    text = system if isinstance(system, str) else _text(system, "system")
    return [{"role": "system", "content": text}] if text else []


def _messages(message: Message, index: int) -> list[dict[str, Any]]:
    """One Messages API message as the chat messages it is."""
    where = f"messages[{index}]"
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    parts: list[dict[str, Any]] = []  # text and image parts, in order
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(message.content):
        kind, at = block.get("type"), f"{where}.content[{j}]"
        if kind == "text":
            parts.append({"type": "text", "text": _string(block, "text", at)})
        elif kind == "image" and message.role == "user":
            parts.append(image_part(_image_url(block, at)))
        elif kind == "tool_use" and message.role == "assistant":
            arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
            function = {"name": _string(block, "name", at), "arguments": arguments}
            calls.append({"id": _string(block, "id", at), "type": "function", "function": function})
        elif kind == "tool_result" and message.role == "user":
            content = block.get("content")
            text = content if isinstance(content, str) else _text(content or [], at + ".content")
            if block.get("is_error"):
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": _string(block, "tool_use_id", at), "content": text})
        elif kind in ("thinking", "redacted_thinking") and message.role == "assistant":
            continue  # earlier turns' thinking is not part of the prompt
        elif kind in ("document", "search_result", "container_upload"):
            raise ApiError.unsupported(f"{at}.type", f"{kind} blocks: this server takes text and images only")
        else:
            raise ApiError(400, f"{at}.type: {kind!r} blocks are not taken in a {message.role} message", param=at)
    if len(calls) > MAX_TOOL_CALLS:  # a chat's assistant turn holds at most this many
        message = f"{where}.content: at most {MAX_TOOL_CALLS} tool_use blocks, got {len(calls)}"
        raise ApiError(400, message, param=f"{where}.content")
    out = list(results)
    if parts or calls or not results:
        turn: dict[str, Any] = {"role": message.role, "content": _content(parts) if parts or not calls else None}
        if calls:
            turn["tool_calls"] = calls
        out.append(turn)
    return out


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """A message's content: its text blocks joined by newlines; with images, its text and image parts in order."""
    if any(part["type"] == "image_url" for part in parts):
        return parts
    return "\n".join(part["text"] for part in parts)


def image_blocks(body: MessagesRequest | CountTokensRequest) -> list[str]:
    """The name of each image block's source, in the order the chat holds their parts (`images_named`)."""
    return [
        f"messages[{i}].content[{j}].source"
        for i, message in enumerate(body.messages)
        if message.role == "user" and isinstance(message.content, list)
        for j, block in enumerate(message.content)
        if block.get("type") == "image"
    ]


def _image_url(block: dict[str, Any], where: str) -> str:
    """An image block's source as the chat's image URL: a `base64` source as a data: URL, a `url` source as its URL;
    a `file` source is refused (files are not stored here)."""
    source, at = block.get("source"), f"{where}.source"
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        media_type = _string(source, "media_type", at)
        return f"data:{media_type};base64,{_string(source, 'data', at)}"
    if kind == "url":
        url = _string(source, "url", at)
        if not url:
            raise ApiError(400, f"{at}.url: the URL is empty", param=f"{at}.url")
        return url
    if kind == "file":
        raise ApiError.unsupported(f"{at}.type", "file sources: files are not stored here; send base64 or url")
    raise ApiError(400, f"{at}.type: an image source is base64 or url, got {kind!r}", param=f"{at}.type")


def _text(blocks: list[dict[str, Any]], where: str) -> str:
    """Text blocks joined (a tool result's or the system's); other blocks are refused by name."""
    if not isinstance(blocks, list):
        raise ApiError(400, f"{where}: a string or a list of text blocks is required", param=where)
    parts = []
    for j, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ApiError.unsupported(f"{where}[{j}].type", f"{kind} blocks: text only here")
        parts.append(_string(block, "text", f"{where}[{j}]"))
    return "\n".join(parts)


def _string(block: dict[str, Any], key: str, where: str) -> str:
    value = block.get(key)
    if not isinstance(value, str):
        raise ApiError(400, f"{where}.{key}: a string is required, got {value!r}", param=f"{where}.{key}")
    return value


def _tools(tools: list[dict[str, Any]] | None) -> list[Tool]:
    """Custom tools as functions; the API's server tools (web search, code execution, ...) are tools this server
    cannot run, left out with a log line so the rest of the request is served."""
    functions = []
    for i, tool in enumerate(tools or ()):
        kind = tool.get("type", "custom")
        if kind != "custom":
            log.info("anthropic_tool_skipped", tool=tool.get("name"), type=kind, reason="a server tool: not run here")
            continue
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise ApiError(400, f"tools[{i}].input_schema: a JSON schema object is required", param=f"tools[{i}]")
        description = tool.get("description") if isinstance(tool.get("description"), str) else None
        function = {"name": _string(tool, "name", f"tools[{i}]"), "description": description, "parameters": schema}
        try:  # the name checked as an OpenAI function's is
            functions.append(msgspec.convert({"type": "function", "function": function}, Tool))
        except msgspec.ValidationError as exc:
            raise ApiError(400, f"tools[{i}].name: {exc}", param=f"tools[{i}].name") from None
    return functions


def _tool_choice(choice: dict[str, Any] | None) -> tuple[ToolChoice | None, bool]:
    """(the chat's `tool_choice`, whether calls may come several at once)."""
    if choice is None:
        return None, True
    parallel = not choice.get("disable_parallel_tool_use", False)
    kind = choice.get("type")
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", parallel
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str):
            raise ApiError(400, "tool_choice.name: the tool to call is required", param="tool_choice")
        return NamedToolChoice(type="function", function=NamedFunction(name=name)), parallel
    raise ApiError(400, f"tool_choice.type: auto, any, tool or none, got {kind!r}", param="tool_choice")
