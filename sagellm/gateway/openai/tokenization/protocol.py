"""The bodies of vLLM's `POST /tokenize` and `POST /detokenize`, in vLLM's shapes: a prompt or a chat's messages (with
its tools) to count as served, and token ids to decode."""

from __future__ import annotations

from typing import Annotated

import msgspec

from sagellm.gateway.openai.chat_completion.protocol import Messages, Tools
from sagellm.runtime.engine.request_limits import MAX_DETOKENIZE_TOKENS
from sagellm.runtime.pipeline.messages import TokenId


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """One of `prompt` (completion-style) or `messages` (chat-style), as vLLM takes them."""

    model: str | None = None
    prompt: str | None = None
    messages: Messages | None = None
    tools: Tools | None = None
    add_special_tokens: bool | None = None  # None: as the server would (a prompt with them, a chat as rendered)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: Annotated[list[TokenId], msgspec.Meta(max_length=MAX_DETOKENIZE_TOKENS)]
