"""What each field of a Messages API request does here, in one phrase: the words the docs' request reference shows.
Fields the engine has nothing to do with (`cache_control`, `context_management`, `service_tier`, `container`, betas)
are not in the bodies: unknown fields are accepted without effect, as the reference says."""

from __future__ import annotations

FIELD_HELP: dict[str, str] = {
    "model": "the served model name (`/v1/models`; `--served-model-name` gives it more names, such as a client's own)",
    "messages": "`user`, `assistant` and `system` turns: a string, or `text`, `tool_use`, `tool_result`, `thinking` "
    "blocks, and a user's `image` blocks (`base64` or `url` sources, for a model with a vision encoder; earlier "
    "thinking is left out of the prompt; documents are refused)",
    "max_tokens": "required: most tokens to generate",
    "system": "a string or text blocks, put first as the system message",
    "stop_sequences": "strings that end the reply: `stop_reason` is then `stop_sequence`, naming it",
    "stream": "reply as Anthropic's events (`message_start` ... `message_stop`)",
    "temperature": "sampling temperature; 0 is greedy (the SDK sends it as an extra body field)",
    "top_p": "nucleus sampling",
    "top_k": "sample from the k most likely tokens",
    "metadata": "`user_id`: the caller, for admission's per-user rate limit and `affinity` routing",
    "tools": "custom tools (`name`, `description`, `input_schema`); server tools (web search, ...) left out, logged",
    "tool_choice": "`auto`, `any` (a call is forced), `tool` with `name` (that call is forced), `none`; "
    "`disable_parallel_tool_use`",
    "thinking": "`adaptive`; `disabled` (the template's `enable_thinking` off); `enabled` with `budget_tokens`: the "
    "engine closes the thinking after that many tokens (needs a reasoning parser)",
    "output_config": '`format`: `{"type": "json_schema", "schema": ...}` makes the reply\'s text follow the '
    "schema (guided decoding, as `response_format`; what the SDK's `messages.parse` sends); `effort` has no effect",
}


def field_help(body: str, field: str) -> str | None:
    """What `field` of a Messages API body does (the same on `/v1/messages` and `count_tokens`)."""
    return FIELD_HELP.get(field)
