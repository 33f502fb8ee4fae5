"""The body of `POST /v1/chat/completions` and the pipeline `Request` of a chat: its messages, tools and the chat
template's settings on top of what every generation takes (`generation.protocol`). The Anthropic Messages API and
the Responses API build these bodies too: theirs are run as the chats they are."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, Literal, NamedTuple

import msgspec

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.media.by_uuid import MAX_UUID_CHARS
from sagellm.gateway.openai.generation.protocol import (
    GenerationRequest,
    check_unsupported,
    refuse,
    sampling_params,
    scheduling,
)
from sagellm.gateway.openai.generation.vllm_fields import UNSET as NOT_SENT
from sagellm.gateway.replies.tools import Tool, ToolChoice
from sagellm.runtime.engine.guided_params import GuidedDecoding
from sagellm.runtime.engine.request_limits import (
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    MAX_TEMPLATE_KWARGS,
    MAX_TOOL_CALLS,
    MAX_TOOLS,
)
from sagellm.runtime.engine.sampling_params import MAX_LOGPROBS
from sagellm.runtime.pipeline.messages import Request

# The capped lists and maps the APIs share (`request_limits`): a longer one is a 400 naming it, from the decoder.
ContentParts = Annotated[list[dict[str, Any]], msgspec.Meta(max_length=MAX_CONTENT_PARTS)]
ToolCalls = Annotated[list[dict[str, Any]], msgspec.Meta(max_length=MAX_TOOL_CALLS)]
TemplateKwargs = Annotated[dict[str, Any], msgspec.Meta(max_length=MAX_TEMPLATE_KWARGS)]
AUDIO_PARTS = ("input_audio", "audio_url")  # OpenAI's content part of base64 audio; vLLM's of an audio URL


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | ContentParts | None = None
    name: str | None = None
    tool_calls: ToolCalls | None = None  # an assistant's calls, as its reply gave them
    reasoning_content: str | None = None  # vLLM's: an assistant's thinking, as its reply gave it (Harmony keeps it)
    tool_call_id: str | None = None  # a tool message: the call it answers


Messages = Annotated[list[ChatMessage], msgspec.Meta(max_length=MAX_MESSAGES)]
Tools = Annotated[list[Tool], msgspec.Meta(max_length=MAX_TOOLS)]


class ChatCompletionRequest(GenerationRequest, kw_only=True):
    messages: Messages
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: Tools | None = None
    tool_choice: ToolChoice | None = None  # None: "auto" with tools, as OpenAI's
    parallel_tool_calls: bool = True
    echo: bool = False  # vLLM's: refused (a chat's prompt is its messages)
    # vLLM's template settings, rendered with the messages (by the model's template, or the server a chat goes to)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: TemplateKwargs | None = None
    # OpenAI's: how hard a reasoning model thinks, for a model whose chat template takes it (gpt-oss's Harmony)
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    # vLLM's that are refused unless they ask for nothing (`vllm_fields.CHAT_ONLY`)
    documents: Any = NOT_SENT
    chat_template: Any = NOT_SENT
    media_io_kwargs: Any = NOT_SENT
    mm_processor_kwargs: Any = NOT_SENT
    return_prompt_text: Any = NOT_SENT
    include_reasoning: Any = NOT_SENT
    # OpenAI's, the same (`vllm_fields.OPENAI_CHAT`): `store=False`, any `metadata`, `service_tier="auto"` are taken
    store: Any = NOT_SENT
    metadata: Any = NOT_SENT
    service_tier: Any = NOT_SENT
    safety_identifier: Any = NOT_SENT
    prompt_cache_key: Any = NOT_SENT
    prompt_cache_retention: Any = NOT_SENT
    prompt_cache_options: Any = NOT_SENT
    modalities: Any = NOT_SENT
    audio: Any = NOT_SENT
    prediction: Any = NOT_SENT
    web_search_options: Any = NOT_SENT
    verbosity: Any = NOT_SENT
    moderation: Any = NOT_SENT
    functions: Any = NOT_SENT
    function_call: Any = NOT_SENT
    index: str | None = None  # sageLLM: answer from this retrieval index (/admin/index), its sources in the reply
    index_k: int = 4  # chunks retrieved from it


def chat_request(
    body: ChatCompletionRequest,
    headers: dict[str, str],
    request_id: str,
    defaults: dict[str, Any] | None,
    guided: GuidedDecoding | None = None,
) -> Request:
    """The pipeline request of a chat; `defaults`: the model's sampling defaults; `guided`: the reply's constraint.
    Without `max_tokens` (or `max_completion_tokens`) the reply is bounded by the context alone, as OpenAI's and
    vLLM's chats are."""
    check_unsupported(body, chat=True)
    if body.echo:
        refuse("echo", "completions echo their prompt; a chat's is its messages")
    if not body.messages:
        refuse("messages", "must hold at least one message")
    if body.top_logprobs is not None and not (body.logprobs and 0 <= body.top_logprobs <= MAX_LOGPROBS):
        refuse("top_logprobs", f"needs logprobs=true and a value in [0, {MAX_LOGPROBS}]")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens, logprobs, defaults, guided)
    now = time.time()
    return Request(
        request_id=request_id,
        messages=template_messages(body.messages),
        template_kwargs=_chat_template_kwargs(body),
        sampling=params,
        model=body.model,
        arrival_time=now,
        **scheduling(body, headers, now),
    )


def _chat_template_kwargs(body: ChatCompletionRequest) -> dict[str, Any] | None:
    if body.continue_final_message and body.messages[-1].role != "assistant":
        refuse("continue_final_message", "the last message must be the assistant's, to continue")
    return template_kwargs(body.add_generation_prompt, body.continue_final_message, body.chat_template_kwargs)


def template_kwargs(
    add_generation_prompt: bool, continue_final_message: bool, extra: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """What a chat's messages are rendered with besides them (vLLM's two switches, and its `chat_template_kwargs`:
    `extra`), for a served chat and for /tokenize alike; None for the default (the generation prompt added). A 400
    for settings that contradict each other."""
    if continue_final_message and add_generation_prompt:
        refuse("continue_final_message", "continues the last message: set add_generation_prompt false with it")
    kwargs = dict(extra or {})
    for name in ("add_generation_prompt", "continue_final_message", "tools", "chat_template", "messages"):
        if name in kwargs:
            refuse("chat_template_kwargs", f"{name} is a field of the request, not of chat_template_kwargs")
    if not add_generation_prompt:
        kwargs["add_generation_prompt"] = False
    if continue_final_message:
        kwargs["continue_final_message"] = True
    return kwargs or None


class MediaPart(NamedTuple):
    """An image or audio part of a chat: `param` names its media field (`messages[0].content[1].image_url`),
    `source` is the image's URL or the audio part's own field (None: a part that gives only its `uuid`), `uuid` the
    name its sender gave it (vLLM's; None: none)."""

    param: str
    source: Any
    uuid: str | None


def image_parts(body: Any) -> list[MediaPart]:
    """Each `image_url` part of the chat's messages (`body.messages`: a chat's, or /tokenize's), in order."""
    return [MediaPart(f"messages[{i}].content[{j}].image_url", _image_url(part, i, j), _uuid(part, i, j))
            for i, j, part in _parts(body, ("image_url",))]  # fmt: skip


def audio_parts(body: Any) -> list[MediaPart]:
    """Each audio part of the chat's messages, in order: OpenAI's `input_audio` (base64 data and its format) and
    vLLM's `audio_url`, `source` the part's own field ({data, format} or {url})."""
    return [MediaPart(f"messages[{i}].content[{j}].{part['type']}", _audio(part, i, j), _uuid(part, i, j))
            for i, j, part in _parts(body, AUDIO_PARTS)]  # fmt: skip


def _parts(body: Any, kinds: tuple[str, ...]) -> Iterator[tuple[int, int, dict[str, Any]]]:
    for i, message in enumerate(body.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.get("type") in kinds:
                    yield i, j, part


def image_part(url: str) -> dict[str, Any]:
    """The chat's `image_url` part for an image another API's request holds (a data: URL or an http(s) URL)."""
    return {"type": "image_url", "image_url": {"url": url}}


@contextmanager
def images_named(chat: ChatCompletionRequest, names: list[str], audio_names: list[str] | None = None) -> Iterator[None]:
    """For the APIs whose requests are run as chats: a refusal of one of the chat's images (`image_parts`, which
    the media room names as the chat's parts) named as the request named it instead; `names` holds the request's
    names for the chat's images, in the same order (`messages[0].content[1].source` in the Messages API), and
    `audio_names` for its audio parts (None: named as the chat's)."""
    renames = {part.param: name for part, name in zip(image_parts(chat), names, strict=True)}
    if audio_names is not None:
        renames |= {part.param: name for part, name in zip(audio_parts(chat), audio_names, strict=True)}
    try:
        yield
    except ApiError as error:
        param = error.param or ""
        for chat_param, name in renames.items():
            if param == chat_param or param.startswith(chat_param + "."):
                message, renamed = error.message.replace(chat_param, name, 1), param.replace(chat_param, name, 1)
                raise ApiError(error.http_status, message, param=renamed, code=error.code) from None
        raise


def _uuid(part: dict[str, Any], i: int, j: int) -> str | None:
    uuid = part.get("uuid")
    if uuid is not None and not (isinstance(uuid, str) and 0 < len(uuid) <= MAX_UUID_CHARS):
        refuse(f"messages[{i}].content[{j}].uuid", f"must be a string of 1 to {MAX_UUID_CHARS} characters")
    return uuid


def _image_url(part: dict[str, Any], i: int, j: int) -> str | None:
    """The part's URL; None where it gives only its uuid (the image sent before under it)."""
    image = part.get("image_url")
    if image is None and _uuid(part, i, j) is not None:
        return None
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        refuse(f"messages[{i}].content[{j}].image_url", "needs a url (a data: URL, or http(s) from an allowed host)")
    return url


def _audio(part: dict[str, Any], i: int, j: int) -> dict[str, Any] | None:
    """The audio part's own field, checked for its shape: input_audio's {data, format}, audio_url's {url}; None
    where the part gives only its uuid."""
    kind = part["type"]
    param, value = f"messages[{i}].content[{j}].{kind}", part.get(kind)
    if value is None and _uuid(part, i, j) is not None:
        return None
    if kind == "input_audio":
        if not isinstance(value, dict) or not isinstance(value.get("data"), str) or not value["data"]:
            refuse(param, "needs {data: base64 audio, format: 'wav'}")
        if not isinstance(value.get("format"), str):
            refuse(f"{param}.format", "needs the audio's format ('wav')")
        return value
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        refuse(param, "needs a url (a data: URL, or http(s) from an allowed host)")
    return {"url": url}


def template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """A chat's messages as its chat template renders them when it is served (and when `/tokenize` counts it)."""
    return [_message_dict(m, i) for i, m in enumerate(messages)]


def _message_dict(message: ChatMessage, index: int) -> dict[str, Any]:
    """Text content as the chat template wants it: text parts joined; with media, the parts as Hugging Face
    templates iterate them ({"type": "text", "text": ...}, {"type": "image"} where each image stands, and
    {"type": "audio", "audio": None} where each clip does: Qwen2-Audio's template asks for an "audio" key)."""
    content = message.content
    if isinstance(content, list):
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            if part.get("type") == "image_url":
                _image_url(part, index, j)
                parts.append({"type": "image"})
            elif part.get("type") in AUDIO_PARTS:
                _audio(part, index, j)
                parts.append({"type": "audio", "audio": None})
            elif part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            else:
                kinds = "text, image_url, input_audio and audio_url"
                refuse(f"messages[{index}].content[{j}]", f"content parts are {kinds}")
        media = any(part["type"] != "text" for part in parts)
        content = parts if media else "".join(part["text"] for part in parts)
    out: dict[str, Any] = {"role": message.role, "content": content or ""}
    for name in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
        if getattr(message, name) is not None:
            out[name] = getattr(message, name)
    return out
