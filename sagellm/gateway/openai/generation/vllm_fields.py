"""vLLM's (and a few of SGLang's) request fields this server does not serve, and OpenAI's chat fields it does not,
refused by name when a request asks for something with them.

A client written for vLLM sends vLLM's extra fields; one accepted and ignored would change what the client gets
without a word (a `use_beam_search` run answered by sampling, a `cache_salt` that isolates nothing). So each is
declared on the request bodies, where its presence is seen, and refused with a 400 naming it unless it holds a value
that asks for nothing (vLLM's default). OpenAI's own chat fields are held to the same rule: the openai SDK sends
`store=False` or `service_tier="auto"` as a program's habit, and a `metadata` map or a `prompt_cache_key` only ever
asks OpenAI to keep or route something (ANY_VALUE: every value asks for nothing), so those are taken, as vLLM takes
them; `modalities=["audio"]` or `store=True` ask for what this server does not do, and are refused. A field of
neither API is refused too, as unknown (`generation/protocol.py`). The fields sageLLM serves are the bodies' own
(each endpoint's `protocol.py`)."""

from __future__ import annotations

from typing import Any

import msgspec

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.openai.generation.structured import Constrained

UNSET: Any = msgspec.UNSET
_NO_MULTIMODAL = "this server takes text (or token ids) only"


class _AnyValue:
    """In a table's values that ask for nothing: every value does (a field only kept or routed on by OpenAI)."""

    def __repr__(self) -> str:
        return "any value"


ANY_VALUE: Any = _AnyValue()

# name -> (the values that ask for nothing, why anything else is refused); for both endpoints
SHARED: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_beam_search": ((False,), "beam search is not implemented: sample n choices instead"),
    "length_penalty": ((1, 1.0), "it weighs beam search, which is not implemented"),
    "watermarking": ((None,), "watermarked sampling is not implemented"),
    "spaces_between_special_tokens": ((True,), "special tokens are always decoded as the tokenizer joins them"),
    "truncate_prompt_tokens": ((None,), "prompts are not truncated here: a prompt over the context is a 400"),
    "truncation_side": ((None,), "prompts are not truncated here: a prompt over the context is a 400"),
    "logprob_token_ids": ((None,), "ask for logprobs with top alternatives instead"),
    "prompt_embeds": ((None,), "prompts are text or token ids here"),
    "request_id": ((None,), "send it as the X-Request-Id header, which the reply carries back"),
    "session_id": ((None,), "sessions are sageLLM's /v1/sessions here"),
    "return_tokens_as_token_ids": ((None, False), "ask for return_token_ids instead"),
    "return_token_offsets": ((False,), "not implemented"),
    "routed_experts_prompt_start": ((0,), "routed experts are not reported"),
    "mm_payload": (("tensors",), _NO_MULTIMODAL),
    "return_mm_kwargs": ((None, False), _NO_MULTIMODAL),
    "ec_transfer_params": ((None,), _NO_MULTIMODAL),
    "vllm_xargs": ((None,), "no custom logits processors run here"),
    "repetition_detection": ((None,), "not implemented: repetition_penalty and frequency_penalty are"),
    "stream_interval": ((None, 1), "every delta is streamed as it is made"),
    # SGLang's, which vllm-router (the PD proxy vLLM deployments run) sends with its defaults
    "no_stop_trim": ((None, False), "a stop string is always trimmed from the text"),
    "return_hidden_states": ((None, False), "hidden states are not returned"),
}
COMPLETION_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "add_special_tokens": ((True,), "a text prompt is tokenized with the model's special tokens: send token ids"),
}
CHAT_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "add_special_tokens": ((False,), "the chat template places the special tokens"),
    "documents": ((None,), "ground a chat in an index (`index`) instead"),
    "chat_template": ((None,), "this server renders chats with the model's own template (vLLM's default too)"),
    "media_io_kwargs": ((None,), _NO_MULTIMODAL),
    "mm_processor_kwargs": ((None,), _NO_MULTIMODAL),
    "return_prompt_text": ((None, False), "ask /tokenize for the rendered prompt"),
    "include_reasoning": ((True,), "this server's models are not reasoning models"),
}
# OpenAI's chat fields (the openai SDK's `chat.completions.create` arguments) that the chat body has no field of its own
# for; the same rule as vLLM's
OPENAI_CHAT: dict[str, tuple[tuple[Any, ...], str]] = {
    "store": ((None, False), "completions are not stored here: nothing keeps them for distillation or evals"),
    "metadata": ((ANY_VALUE,), "OpenAI only stores it with a stored completion; it never changes the reply"),
    "service_tier": ((None, "auto", "default"), "one tier serves every request here: order them with `priority`"),
    "safety_identifier": ((ANY_VALUE,), "an opaque end-user id for OpenAI's abuse detection; the reply is the same"),
    "prompt_cache_key": ((ANY_VALUE,), "every prompt's prefix is cached here and found by its tokens, whatever key"),
    "prompt_cache_retention": ((None, "in_memory"), "cached prefixes stay while the KV cache has room, no longer"),
    "prompt_cache_options": ((None,), "cached prefixes are found by their tokens: no breakpoints or lifetimes"),
    "modalities": ((None, ["text"]), "replies are text only: no audio output"),
    "audio": ((None,), "replies are text only: no audio output"),
    "prediction": ((None,), "predicted outputs are not implemented (speculative decoding is a server setting)"),
    "web_search_options": ((None,), "no web search runs here: give the model a search tool (`tools`)"),
    "verbosity": ((None, "medium"), "not implemented: ask for a length in the prompt, or cap it with `max_tokens`"),
    "moderation": ((None,), "no moderation runs here"),
    "functions": ((None,), "the deprecated function calling: send `tools`"),
    "function_call": ((None,), "the deprecated function calling: send `tool_choice`"),
}


class VllmFields(Constrained, kw_only=True):
    """vLLM's fields of both endpoints (SHARED), declared so their presence is seen (UNSET: not sent); the chat's own
    (CHAT_ONLY) are declared on its body."""

    use_beam_search: Any = UNSET
    length_penalty: Any = UNSET
    watermarking: Any = UNSET
    spaces_between_special_tokens: Any = UNSET
    truncate_prompt_tokens: Any = UNSET
    truncation_side: Any = UNSET
    logprob_token_ids: Any = UNSET
    prompt_embeds: Any = UNSET
    request_id: Any = UNSET
    session_id: Any = UNSET
    return_tokens_as_token_ids: Any = UNSET
    return_token_offsets: Any = UNSET
    routed_experts_prompt_start: Any = UNSET
    mm_payload: Any = UNSET
    return_mm_kwargs: Any = UNSET
    ec_transfer_params: Any = UNSET
    vllm_xargs: Any = UNSET
    repetition_detection: Any = UNSET
    stream_interval: Any = UNSET
    no_stop_trim: Any = UNSET
    return_hidden_states: Any = UNSET
    add_special_tokens: Any = UNSET


def unserved(chat: bool) -> dict[str, tuple[tuple[Any, ...], str]]:
    """The fields a chat's body (`chat`) or a completion's declares only to see them: name -> (the values that ask
    for nothing, why anything else is refused)."""
    return SHARED | (CHAT_ONLY | OPENAI_CHAT if chat else COMPLETION_ONLY)


def refuse_unserved(body: Any, chat: bool) -> None:
    """A 400 naming the first of those fields the body sets to something this server does not serve."""
    for name, (asks_nothing, why) in unserved(chat).items():
        value = getattr(body, name)
        if value is not UNSET and not _asks_nothing(value, asks_nothing):
            raise ApiError.unsupported(name, why)


def _asks_nothing(value: Any, values: tuple[Any, ...]) -> bool:
    """`value` is one of `values` (False is not 0 here), or `values` take any."""
    return ANY_VALUE in values or any(value == v and type(value) is type(v) for v in values)
