"""Ollama's request bodies, and the OpenAI chat or completion each is: `/api/chat` is the chat its messages are,
`/api/generate` a one-turn chat of its `prompt` (and `system`) through the model's template, or with `raw` the
completion of the prompt as it is. So admission, policy, route, failover, guided decoding and tool parsing are the
chat's own.

Messages map field by field: `images` (base64, as Ollama sends them) become the message's image parts, an
assistant's `tool_calls` (arguments as an object) OpenAI's calls with ids made here, and a `tool` message answers the
latest call of its `tool_name` not yet answered. `format` is `json` (any JSON object) or a JSON schema; `think`
true / false turns a thinking model's thinking on or off, `low` / `medium` / `high` is the reasoning effort.
`options` are mapped onto our sampling fields (`num_predict` is max_tokens, `repeat_penalty` the repetition
penalty); what Ollama sets at load (threads, GPU layers, memory mapping, `num_ctx`: the context is this server's,
fixed at start) places the model and asks nothing of a request, so it is taken without effect; a sampling option
we do not implement (mirostat, tail-free, typical sampling) is a 400 naming it unless it asks for nothing."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Annotated, Any, Literal

import msgspec
import structlog

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.openai.chat_completion.protocol import ChatCompletionRequest, ChatMessage, image_part
from sagellm.gateway.openai.completion.protocol import CompletionRequest
from sagellm.gateway.replies.tools import Tool
from sagellm.runtime.engine.request_limits import MAX_CONTENT_PARTS, MAX_MESSAGES, MAX_TOOL_CALLS, MAX_TOOLS

log = structlog.get_logger("sagellm.gateway")

Images = Annotated[list[str], msgspec.Meta(max_length=MAX_CONTENT_PARTS)]
ToolCalls = Annotated[list[dict[str, Any]], msgspec.Meta(max_length=MAX_TOOL_CALLS)]


class Message(msgspec.Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: Images | None = None
    tool_calls: ToolCalls | None = None
    tool_name: str | None = None
    thinking: str | None = None  # an earlier turn's thinking: left out of the prompt, as Ollama's templates leave it


class Generation(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What `/api/chat` and `/api/generate` share."""

    model: str
    stream: bool = True  # Ollama streams unless told not to
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    keep_alive: str | float | None = None
    think: bool | Literal["low", "medium", "high"] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class ChatRequest(Generation, kw_only=True, forbid_unknown_fields=True):
    messages: Annotated[list[Message], msgspec.Meta(max_length=MAX_MESSAGES)] = []
    tools: Annotated[list[dict[str, Any]], msgspec.Meta(max_length=MAX_TOOLS)] | None = None


class GenerateRequest(Generation, kw_only=True, forbid_unknown_fields=True):
    prompt: str = ""
    system: str | None = None
    images: Images | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None


class EmbedRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    input: str | list[str]
    truncate: bool = True
    options: dict[str, Any] | None = None
    keep_alive: str | float | None = None
    dimensions: int | None = None


class EmbeddingsRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The older `/api/embeddings`: one prompt, one vector."""

    model: str
    prompt: str
    options: dict[str, Any] | None = None
    keep_alive: str | float | None = None


class ModelRequest(msgspec.Struct, kw_only=True):
    """`/api/show`'s body (`name` is the older spelling of `model`)."""

    model: str | None = None
    name: str | None = None
    verbose: bool = False

    def named(self) -> str:
        if not (self.model or self.name):
            raise ApiError(400, "model: the model to show is required", param="model")
        return self.model or self.name or ""


class PullRequest(ModelRequest, kw_only=True):
    insecure: bool = False
    stream: bool = True


# Ollama's options that map onto a field of ours: (our field, the value's type, checked here so a bad one is a 400
# naming the option). `logit_bias` and `reasoning_effort` are not Ollama's, but Open WebUI sends its chat settings
# as options; both are a chat's own here.
SAMPLING_OPTIONS: dict[str, tuple[str, Any]] = {
    "temperature": ("temperature", float),
    "top_p": ("top_p", float),
    "top_k": ("top_k", int),
    "min_p": ("min_p", float),
    "seed": ("seed", int),
    "stop": ("stop", str | list[str]),
    "repeat_penalty": ("repetition_penalty", float),
    "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float),
    "logit_bias": ("logit_bias", dict[str, float]),
    "reasoning_effort": ("reasoning_effort", Literal["low", "medium", "high"]),
}
# Set at load in Ollama (where and how the model runs), not per request: taken without effect here.
LOAD_OPTIONS = frozenset(
    {"num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "numa", "num_thread", "use_mmap", "use_mlock"}
    | {"vocab_only", "logits_all", "embedding_only", "f16_kv", "num_keep"}
)
# Sampling options we do not implement, and the value at which each asks for nothing.
NO_OP_VALUES = {"mirostat": 0, "mirostat_tau": None, "mirostat_eta": None, "tfs_z": 1.0, "typical_p": 1.0}
# Ollama's default window of the repeat penalty (64 tokens); ours covers the whole context, as -1 asks.
WHOLE_CONTEXT = -1


def sampling_fields(options: dict[str, Any] | None) -> dict[str, Any]:
    """`options` as a chat's or completion's sampling fields; a 400 naming an option we do not implement."""
    fields: dict[str, Any] = {}
    for name, value in (options or {}).items():
        where = f"options.{name}"
        if name in SAMPLING_OPTIONS:
            field, kind = SAMPLING_OPTIONS[name]
            try:
                fields[field] = msgspec.convert(value, kind)
            except msgspec.ValidationError as exc:
                raise ApiError(400, f"{where}: {exc}", param=where) from None
        elif name == "num_predict":
            if not isinstance(value, int) or isinstance(value, bool) or value < -2 or value == 0:
                raise ApiError(400, f"{where}: tokens to generate (>= 1), or -1 / -2 for no limit", param=where)
            fields["max_tokens"] = value if value > 0 else None
        elif name == "repeat_last_n":
            if value not in (WHOLE_CONTEXT, 0) and (options or {}).get("repeat_penalty", 1.0) != 1.0:
                why = "the repeat penalty here covers the whole context (-1); a window is not implemented"
                raise ApiError.unsupported(where, why)
        elif name in NO_OP_VALUES:
            if value is not None and NO_OP_VALUES[name] is not None and value != NO_OP_VALUES[name]:
                raise ApiError.unsupported(where, f"{name} sampling is not implemented here")
        elif name in LOAD_OPTIONS or name == "penalize_newline":
            log.debug("ollama_option_ignored", option=name, reason="set at load in Ollama; this server's is fixed")
        else:
            raise ApiError(400, f"{where}: not an option Ollama takes", param=where)
    return fields


def chat_of(body: ChatRequest, model: str | None) -> ChatCompletionRequest:
    """The chat an `/api/chat` body is; `model`: the served name it runs on."""
    if not body.messages:
        raise ApiError(400, "messages: at least one message is required", param="messages")
    messages = _messages(body.messages)
    tools = _tools(body.tools)
    return _chat(body, model, messages, tools)


def generate_chat(body: GenerateRequest, model: str | None) -> ChatCompletionRequest:
    """The one-turn chat a templated `/api/generate` is: `system`, then the prompt (and images) as the user's."""
    _refuse_generate_fields(body)
    messages: list[Message] = [Message(role="system", content=body.system)] if body.system else []
    messages.append(Message(role="user", content=body.prompt, images=body.images))
    return _chat(body, model, _messages(messages), [])


def raw_completion(body: GenerateRequest, model: str | None) -> CompletionRequest:
    """A `raw` `/api/generate`: the prompt completed as it is, no template around it."""
    _refuse_generate_fields(body)
    if body.images:
        raise ApiError.unsupported("images", "raw prompts take text only; send images without raw")
    if body.system:
        raise ApiError(400, "system: a raw prompt has no template to put it in", param="system")
    if body.think is not None:
        raise ApiError(400, "think: a raw prompt has no template to turn thinking on or off in", param="think")
    refuse_unserved(body)
    fields = sampling_fields(body.options)
    if "reasoning_effort" in fields:
        raise ApiError(400, "options.reasoning_effort: a raw prompt has no template to say it in", param="options")
    return CompletionRequest(
        model=model, prompt=body.prompt, stream=body.stream, response_format=_format(body.format), **fields
    )


def _refuse_generate_fields(body: GenerateRequest) -> None:
    if body.suffix:
        raise ApiError.unsupported("suffix", "fill-in-the-middle is not implemented here")
    if body.template:
        raise ApiError.unsupported("template", "the model's own chat template is used; a Go template is not")
    if body.context:
        raise ApiError.unsupported("context", "Ollama's deprecated context tokens; send the conversation to /api/chat")


def _chat(
    body: Generation, model: str | None, messages: list[dict[str, Any]], tools: list[Tool]
) -> ChatCompletionRequest:
    refuse_unserved(body)
    fields = sampling_fields(body.options)
    if isinstance(body.think, bool):
        fields["chat_template_kwargs"] = {"enable_thinking": body.think}
    elif body.think is not None:  # a level: the reasoning effort (`think` over Open WebUI's option)
        fields["reasoning_effort"] = body.think
    return ChatCompletionRequest(
        model=model,
        messages=msgspec.convert(messages, list[ChatMessage]),
        tools=tools or None,
        stream=body.stream,
        response_format=_format(body.format),
        **fields,
    )


# Ollama's durations: a number of seconds, or Go's duration text ("5m", "1h30m", "-1").
_DURATION = re.compile(r"^-?(\d+(\.\d+)?(ns|us|µs|ms|s|m|h)?)+$")
_DURATION_PART = re.compile(r"(\d+(\.\d+)?)(ns|us|µs|ms|s|m|h)?")


_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}


def refuse_unserved(body: Generation) -> None:
    """What these routes do not serve yet, refused by name: logprobs."""
    if body.logprobs or body.top_logprobs is not None:
        raise ApiError.unsupported("logprobs", "not served on Ollama's routes yet; /v1/chat/completions has them")


def keep_alive_s(value: str | float | None) -> float | None:
    """Ollama's `keep_alive` in seconds: a number of seconds or a duration (`5m`, `1h30m`); negative: forever
    (math.inf); None when not sent. A 400 naming it for anything else."""
    if value is None:
        return None
    text = str(value).strip()
    if not _DURATION.match(text):
        raise ApiError(400, f"keep_alive: seconds or a duration such as 5m, got {value!r}", param="keep_alive")
    seconds = sum(float(number) * _UNIT_S[unit] for number, _, unit in _DURATION_PART.findall(text))
    return math.inf if text.startswith("-") and seconds > 0 else seconds


def _format(form: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """`format` as the response_format: `json` any JSON object, a schema that schema; "" or none: free text."""
    if form in (None, ""):
        return None
    if form == "json":
        return {"type": "json_object"}
    if isinstance(form, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": form}}
    raise ApiError(400, f'format: "json" or a JSON schema object, got {form!r}', param="format")


def _messages(messages: list[Message]) -> list[dict[str, Any]]:
    """The chat's messages: images as image parts, calls with ids, each tool result answering its call."""
    out: list[dict[str, Any]] = []
    unanswered: list[tuple[str, str]] = []  # (call id, tool name) of the assistant's calls, in order
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        turn: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.images:
            if message.role != "user":
                raise ApiError(400, f"{where}.images: images are taken in a user's message", param=f"{where}.images")
            parts = [{"type": "text", "text": message.content}] if message.content else []
            turn["content"] = parts + [image_part(_data_url(image, f"{where}.images[{j}]"))
                                       for j, image in enumerate(message.images)]  # fmt: skip
        if message.tool_calls:
            if message.role != "assistant":
                raise ApiError(400, f"{where}.tool_calls: an assistant's", param=f"{where}.tool_calls")
            calls = [_call(c, f"{where}.tool_calls[{j}]", f"call_{i}_{j}") for j, c in enumerate(message.tool_calls)]
            unanswered = [(call["id"], call["function"]["name"]) for call in calls]
            turn["tool_calls"] = calls
        if message.role == "tool":
            turn["tool_call_id"] = _answered(unanswered, message.tool_name, i)
        out.append(turn)
    return out


def _answered(unanswered: list[tuple[str, str]], name: str | None, index: int) -> str:
    """The id of the call a tool message answers: the first unanswered one of its `tool_name` (or the first
    unanswered one without a name), taken off the list; an id of its own where no call is left."""
    for k, (call_id, called) in enumerate(unanswered):
        if name is None or called == name:
            del unanswered[k]
            return call_id
    return f"call_tool_{index}"


def _call(call: dict[str, Any], where: str, call_id: str) -> dict[str, Any]:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ApiError(400, f"{where}.function.name: a tool call names its function", param=where)
    arguments = function.get("arguments") or {}
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    named = {"name": function["name"], "arguments": text}
    return {"id": call.get("id") or call_id, "type": "function", "function": named}


def _tools(tools: list[dict[str, Any]] | None) -> list[Tool]:
    out = []
    for i, tool in enumerate(tools or ()):
        try:
            out.append(msgspec.convert({"type": "function", **tool}, Tool))
        except msgspec.ValidationError as exc:
            raise ApiError(400, f"tools[{i}]: {exc}", param=f"tools[{i}]") from None
    return out


# The image kinds a base64 image is told apart by, from its first bytes.
_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"), (b"RIFF", "image/webp"))
_DATA_URL = re.compile(r"^data:[\w/+.-]+;base64,")


def _data_url(image: str, where: str) -> str:
    """A base64 image (Ollama's, without a media type) as a data: URL with its type read off its first bytes."""
    if _DATA_URL.match(image):
        return image
    try:
        head = base64.b64decode(image[:24] + "=" * (-len(image[:24]) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: an image is base64 bytes", param=where) from None
    kind = next((media for magic, media in _MAGIC if head.startswith(magic)), None)
    if kind is None:
        raise ApiError(400, f"{where}: not a PNG, JPEG, GIF or WebP image", param=where)
    return f"data:{kind};base64,{image}"
