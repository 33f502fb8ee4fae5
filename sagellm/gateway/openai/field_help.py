"""What each field of the request bodies does here, in one phrase: the words `/openapi.json` gives each property and
the docs' request reference shows. The bodies (each endpoint room's `protocol.py`) say what a field is; this says what
the server does with it. vLLM's fields the server refuses say why in `generation/vllm_fields.py`; the docs' reference
joins both, and a test fails when a body has a field neither explains."""

from __future__ import annotations

import json

from sagellm.gateway.openai.generation.vllm_fields import ANY_VALUE, OPENAI_CHAT, unserved
from sagellm.runtime.engine.request_limits import (
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORD_CHARS,
    MAX_BAD_WORDS,
    MAX_EMBEDDING_INPUTS,
    MAX_LOGIT_BIAS_TOKENS,
    MAX_PROMPTS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
)

# field -> what it does; the same field means the same on every body, except where BY_BODY says otherwise
FIELD_HELP: dict[str, str] = {
    # every generation body
    "model": "the served model name (`/v1/models`); default: the gateway's own model",
    "max_tokens": "most tokens to generate (default: to EOS, a stop or the context; completions: 16, OpenAI's)",
    "temperature": "sampling temperature; 0 is greedy (default: the model's, else 1.0)",
    "top_p": "nucleus sampling: the smallest set of tokens whose probabilities reach it",
    "n": "choices to return, up to 16; each samples with `seed` + i, the prompt prefilled once",
    "stream": "reply as server-sent events, ending with `data: [DONE]`",
    "stream_options": "`include_usage`: a last chunk with the token counts",
    "stop": f"strings that end the reply (at most {MAX_STOP_STRINGS:,}, {MAX_STOP_CHARS:,} characters each; not "
    "included unless `include_stop_str_in_output`)",
    "seed": "the sampler's seed: the same tokens on every path (batching, PD, resume)",
    "user": "the caller's name: admission's per-user rate limit and `affinity` routing read it",
    "presence_penalty": "[-2, 2], subtracted from each token already in the output",
    "frequency_penalty": "[-2, 2], times the count of each token in the output",
    "logit_bias": f"token id -> bias added to its logit, clamped to ±100 (at most {MAX_LOGIT_BIAS_TOKENS:,} token ids)",
    "top_k": "vLLM's: sample from the k most likely tokens (-1 or 0: off)",
    "min_p": "vLLM's: drop tokens below min_p times the most likely one's probability",
    "repetition_penalty": "vLLM's: over prompt and output tokens, as transformers applies it (1: off)",
    "min_tokens": "vLLM's: EOS and stop tokens are masked until this many tokens are out",
    "bad_words": f"vLLM's: words (as token sequences) never generated (at most {MAX_BAD_WORDS:,}, "
    f"{MAX_BAD_WORD_CHARS:,} characters each)",
    "allowed_token_ids": f"vLLM's: the only tokens that may be generated (at most {MAX_ALLOWED_TOKEN_IDS:,})",
    "ignore_eos": "vLLM's: keep generating past EOS (benchmarks)",
    "stop_token_ids": f"vLLM's: token ids that end the reply (at most {MAX_STOP_TOKEN_IDS:,})",
    "skip_special_tokens": "vLLM's: leave special tokens out of the text",
    "include_stop_str_in_output": "vLLM's: keep the matched stop string in the text",
    "return_token_ids": "each choice, and each streamed chunk, also carries its output token ids",
    "prompt_logprobs": "vLLM's: every prompt token's logprob and its top alternatives (not with `stream`)",
    "cache_salt": "vLLM's: the prompt shares prefix-cache blocks only with requests of the same salt (tenants apart)",
    "thinking_token_budget": "vLLM's: a reasoning model thinks at most this many tokens, then its thinking is closed "
    "for it and the answer follows (needs a reasoning parser)",
    "kv_transfer_params": "vLLM's disaggregated serving across servers: prefill here, decode elsewhere, or the reverse "
    "(on a server started with --kv-transfer-role; a decode fetches only from its --kv-transfer-peers)",
    "priority": "a number (lower first) or `critical`, `high`, `normal`, `low` (which yields to the others in the "
    "engine: a batch job's class); also the `X-Request-Priority` header",
    "cost_budget": "the most the request may cost, in the instances' price unit (`cost_optimized` policy)",
    "ttft_slo_ms": "time-to-first-token target, for `slo_aware` ordering and SLO metrics",
    "tpot_slo_ms": "time-per-output-token target, for SLO metrics",
    "slo_deadline_ms": "end-to-end deadline; also the `X-SLO-Deadline-Ms` header",
    "first_token_timeout": "seconds without a first token before the attempt is abandoned and failed over",
    "token_timeout": "seconds without a next token before the attempt is abandoned and failed over",
    # structured output
    "response_format": "type `json_object`, or `json_schema` with its `json_schema`: the reply follows it",
    "structured_outputs": "vLLM's: one of `json`, `json_object`, `regex`, `choice`, `grammar` (+ whitespace flag)",
    "guided_json": "vLLM's older form of `structured_outputs.json`",
    "guided_regex": "vLLM's older form of `structured_outputs.regex`",
    "guided_choice": "vLLM's older form of `structured_outputs.choice`",
    "guided_grammar": "vLLM's older form of `structured_outputs.grammar`",
    "guided_whitespace_pattern": "refused when given: set `disable_any_whitespace` in `structured_outputs` instead",
    "guided_decoding_backend": "`auto`, `guidance` or `llguidance` (the one used); any other is refused",
    # completions
    "prompt": f"text, a list of texts, token ids, or a list of token-id lists (at most {MAX_PROMPTS:,} prompts, "
    "admitted whole)",
    "logprobs": "completions: the top-N logprobs of each output token (with `echo`, of the prompt's too)",
    "echo": "completions: the prompt before the output; with `max_tokens: 0` the prompt alone, scored",
    "suffix": "refused when not empty: insertion is not served",
    "best_of": "completions: run this many choices, return the `n` of highest cumulative logprob",
    # chat completions
    "messages": "the conversation, rendered with the model's chat template (`tool` results and `tool_calls` too)",
    "max_completion_tokens": "OpenAI's newer name for `max_tokens`",
    "top_logprobs": "with `logprobs: true`, alternatives per token (up to 20)",
    "tools": "functions the model may call (a JSON-schema `parameters` each)",
    "tool_choice": "`auto` (default with tools), `none`, `required`, or a named function (guided to its parameters)",
    "parallel_tool_calls": "whether a reply may hold several calls",
    "add_generation_prompt": "vLLM's: end the rendered prompt with the assistant's turn",
    "continue_final_message": "vLLM's: continue the last (assistant) message instead of starting a new one",
    "chat_template_kwargs": "vLLM's: extra variables for the chat template (Qwen3's `enable_thinking`, say)",
    "reasoning_effort": "`low`, `medium` or `high`: how hard gpt-oss thinks (`Reasoning: ...` in its Harmony system "
    "message); refused for a model whose chat template takes no effort",
    "index": "sageLLM's: answer from this retrieval index (`/admin/index`), its sources in the reply",
    "index_k": "sageLLM's: chunks retrieved from `index` (default 4)",
    # embeddings
    "input": f"embeddings: a text, texts, token ids or lists of them (at most {MAX_EMBEDDING_INPUTS:,}); Responses: a "
    "string or items",
    "encoding_format": "`float` or `base64`",
    "dimensions": "the model's own dimension only: any other is a 400",
    # the Responses API
    "instructions": "a system message in front of the input",
    "text": "`format`: `text`, `json_object` or `json_schema` (the reply follows it)",
    "max_output_tokens": "most tokens to generate; a cut reply is `incomplete`",
    "previous_response_id": "continue a stored response's conversation",
    "conversation": "a conversation (`/v1/conversations`) whose items come first, this turn added to it after",
    "store": "keep the response for `previous_response_id` (the latest 1,000 of each key, readable by that key)",
    "metadata": "string pairs, returned with the response",
    "background": "run it in the background: answered `queued` at once (or its events streamed, with `stream`), "
    "polled with GET /v1/responses/{id}, streamed again from `starting_after`",
    "reasoning": "`effort` goes to a model whose template takes one (gpt-oss: none and minimal are low, xhigh is "
    "high); otherwise `effort` and `summary` are taken and echoed, changing nothing",
    "include": "values naming items this server never makes (`reasoning.encrypted_content`, hosted tools' results) "
    "add nothing; `message.output_text.logprobs` and unknown values are refused",
    "prompt_cache_key": "taken, no effect: every prompt's prefix is cached here and found by its tokens, whatever key",
    # /tokenize and /detokenize
    "return_token_strs": "also return each token's string",
    "tokens": "token ids to turn back into text",
    "add_special_tokens": "with a prompt: tokenize with the model's special tokens (default: as a completion would)",
}

# body -> field -> what it does there, where that differs from FIELD_HELP's
BY_BODY: dict[str, dict[str, str]] = {
    "ChatCompletionRequest": {
        "logprobs": "return the logprob of each output token (with `top_logprobs`, its alternatives)",
        "echo": "refused when true: completions echo their prompt; a chat's is its messages",
    },
    "ResponsesRequest": {
        "input": "a string, or items: messages (`developer` ones as system messages), earlier `function_call`s and "
        "their `function_call_output`s",
        "tools": "functions the model may call (`function`, or a `namespace`'s, its calls naming it); hosted tools "
        "(`web_search`, `file_search`, `custom`, ...) are left out and logged",
        "tool_choice": '`auto`, `none`, `required`, or `{"type": "function", "name": ...}`',
        "stream": "reply as typed events (`response.created`, `response.output_text.delta`, ..., `response.completed`; "
        "`response.failed` for a failure after the start)",
    },
    "EmbeddingRequest": {"user": "the caller's name (admission's per-user rate limit)"},
    "TokenizeRequest": {
        "prompt": "a completion's prompt (give this or `messages`)",
        "messages": "a chat, rendered as `/v1/chat/completions` would (give this or `prompt`)",
        "tools": "tools the chat template shows, counted as the chat request would be",
        "add_generation_prompt": "end the rendered chat with the assistant's turn",
        "continue_final_message": "continue the last (assistant) message",
    },
}


# the bodies vLLM's (and OpenAI's) refused fields are declared on, and which of vllm_fields' tables applies to each
_UNSERVED = {"CompletionRequest": unserved(chat=False), "ChatCompletionRequest": unserved(chat=True)}


def field_help(body: str, field: str) -> str | None:
    """What `field` of the body named `body` does, or None when nothing here says: vLLM's and OpenAI's fields this
    server does not serve read "refused unless VALUE: why" (or "taken at any value, no effect: why"), the rest this
    module's own words."""
    refused = _UNSERVED.get(body, {}).get(field)
    if refused is not None:
        asks_nothing, why = refused
        whose = "OpenAI's" if field in OPENAI_CHAT else "vLLM's"
        if ANY_VALUE in asks_nothing:
            return f"{whose}; taken at any value, no effect: {why}"
        values = " or ".join(json.dumps(v) for v in asks_nothing)
        return f"{whose}; refused unless absent or {values}: {why}"
    return BY_BODY.get(body, {}).get(field) or FIELD_HELP.get(field)
