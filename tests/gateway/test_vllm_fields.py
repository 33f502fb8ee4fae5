"""Every field of vLLM's completions and chat requests (vLLM 0.32's `CompletionRequest` and `ChatCompletionRequest`)
is either served or refused with a 400 naming it: none is accepted and ignored. The walk sends each field not served
with a value that asks for something; the served ones have their own tests (penalties, structured output, tools,
echo, ...), and here only the chat template's settings, which have no other."""

from __future__ import annotations

import httpx
import pytest

from sagellm.gateway.openai.chat_completion.protocol import ChatCompletionRequest
from sagellm.gateway.openai.completion.protocol import CompletionRequest
from sagellm.gateway.openai.generation.vllm_fields import unserved
from tests.gateway.conftest import REPLY_TIMEOUT_S


def _names(words: str) -> list[str]:
    return words.split()


# vLLM 0.32's request fields, as its protocol module declares them: both endpoints', then each one's own.
VLLM_BOTH = _names("""
model echo frequency_penalty logit_bias logprobs max_tokens n presence_penalty seed stop stream stream_options
temperature top_p user use_beam_search top_k min_p repetition_penalty watermarking length_penalty stop_token_ids
include_stop_str_in_output ignore_eos min_tokens skip_special_tokens spaces_between_special_tokens
truncate_prompt_tokens truncation_side allowed_token_ids prompt_logprobs logprob_token_ids bad_words
add_special_tokens response_format structured_outputs priority request_id session_id return_tokens_as_token_ids
return_token_ids routed_experts_prompt_start return_token_offsets mm_payload return_mm_kwargs cache_salt
kv_transfer_params ec_transfer_params vllm_xargs repetition_detection thinking_token_budget stream_interval
""")
VLLM_COMPLETION = VLLM_BOTH + _names("""
prompt suffix prompt_embeds
""")
VLLM_CHAT = VLLM_BOTH + _names("""
messages top_logprobs max_completion_tokens tools tool_choice reasoning_effort include_reasoning
parallel_tool_calls add_generation_prompt continue_final_message documents chat_template chat_template_kwargs
media_io_kwargs mm_processor_kwargs return_prompt_text
""")
# Refused by the request's own checks (not vLLM-only fields): suffix, a chat's echo.
REFUSED_ELSEWHERE = {"suffix": "tail", "echo": True}
# A value of each refused field that asks for something.
ASKING = {
    "use_beam_search": True,
    "length_penalty": 0.5,
    "watermarking": {"seed": 1},
    "spaces_between_special_tokens": False,
    "truncate_prompt_tokens": 8,
    "truncation_side": "left",
    "logprob_token_ids": [1],
    "prompt_embeds": "AAAA",
    "request_id": "mine",
    "session_id": "s1",
    "return_tokens_as_token_ids": True,
    "return_token_offsets": True,
    "routed_experts_prompt_start": 2,
    "mm_payload": "base64",
    "return_mm_kwargs": True,
    "kv_transfer_params": {"do_remote_decode": True},
    "ec_transfer_params": {},
    "vllm_xargs": {"x": 1},
    "repetition_detection": {"window": 8},
    "stream_interval": 4,
    "documents": [{"title": "t", "text": "x"}],
    "chat_template": "{{ messages }}",
    "media_io_kwargs": {"video": {}},
    "mm_processor_kwargs": {"fps": 1},
    "return_prompt_text": True,
    "reasoning_effort": "low",
    "include_reasoning": False,
}


@pytest.mark.parametrize(("chat", "fields"), [(False, VLLM_COMPLETION), (True, VLLM_CHAT)], ids=["completions", "chat"])
def test_every_vllm_field_is_served_or_refused(chat: bool, fields: list[str]) -> None:
    body = ChatCompletionRequest if chat else CompletionRequest
    refused = unserved(chat)
    for name in fields:
        assert name in body.__struct_fields__, f"{name} is not even read: it would be ignored"
        assert name not in refused or name in ASKING or name == "add_special_tokens", name


@pytest.mark.parametrize(("chat", "fields"), [(False, VLLM_COMPLETION), (True, VLLM_CHAT)], ids=["completions", "chat"])
def test_each_field_not_served_is_a_400_naming_it(gateway, chat: bool, fields: list[str]) -> None:
    refused = unserved(chat)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    base = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    names = [n for n in fields if n in refused or (n in REFUSED_ELSEWHERE and (chat or n != "echo"))]
    assert len(names) >= 20
    for name in names:
        value = {"add_special_tokens": chat}.get(name, ASKING.get(name, REFUSED_ELSEWHERE.get(name)))
        reply = httpx.post(gateway.url + path, json={**base, "max_tokens": 2, name: value}, timeout=REPLY_TIMEOUT_S)
        assert reply.status_code == 400, (name, reply.text)
        assert reply.json()["error"]["param"] == name, reply.text


def test_values_that_ask_for_nothing_are_accepted(gateway) -> None:
    body = {
        "prompt": "hi",
        "max_tokens": 2,
        "use_beam_search": False,
        "length_penalty": 1.0,
        "spaces_between_special_tokens": True,
        "add_special_tokens": True,
        "routed_experts_prompt_start": 0,
        "mm_payload": "tensors",
    }
    reply = httpx.post(gateway.url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S)
    assert reply.status_code == 200, reply.text


def _chat_prompt_tokens(gateway, messages: list[dict], **fields) -> httpx.Response:
    body = {"messages": messages, "max_tokens": 1, **fields}
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=REPLY_TIMEOUT_S)


def test_the_chat_template_settings_are_rendered(gateway) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with_prompt = _chat_prompt_tokens(gateway, messages).json()["usage"]["prompt_tokens"]
    without = _chat_prompt_tokens(gateway, messages, add_generation_prompt=False).json()["usage"]["prompt_tokens"]
    continued = _chat_prompt_tokens(gateway, messages, add_generation_prompt=False, continue_final_message=True)
    assert without < with_prompt
    assert continued.status_code == 200 and continued.json()["usage"]["prompt_tokens"] < without  # no end of turn
    kwargs = _chat_prompt_tokens(gateway, messages, chat_template_kwargs={"enable_thinking": False})
    assert kwargs.status_code == 200
    both = _chat_prompt_tokens(gateway, messages, continue_final_message=True)
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"
