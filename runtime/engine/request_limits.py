"""How much one request may ask for, field by field: the cap on every list- or map-valued request field.

A body under the gateway's size limit (8 MiB) can still hold a hundred thousand bad words, stop strings or
messages, and each costs work before and during generation: bad words are tokenized twice each and matched at every
step, stop strings are searched at every step, biased and allowed token ids are written into every step's logits,
messages and tools are rendered by the chat template. So each field has a cap, generous for real clients (vLLM and
OpenAI take less in practice) and small enough that a request at every cap is prepared in well under a second, off
the event loop. A request over a cap is refused with a 400 naming the field, never truncated.

The sampling fields are checked by `SamplingParams`, so every entry point (the gateway, `LLM`, the graph's sources)
refuses them alike; the APIs' structure (prompts, messages, content parts, tools, ...) by the bodies that decode it
(`msgspec.Meta(max_length=...)` on the gateway's Structs, which name the field in their 400). The values are listed
for users in docs/serving/openai-api.md ("Request limits")."""

from __future__ import annotations

# -- sampling (SamplingParams) ----------------------------------------------------------------------------------
MAX_STOP_STRINGS = 256  # `stop` (Anthropic's `stop_sequences`): each is searched for at every step
MAX_STOP_CHARS = 1024  # the length of one stop string: the stream holds back that many characters
MAX_STOP_TOKEN_IDS = 1024  # `stop_token_ids`
MAX_BAD_WORDS = 4096  # `bad_words`: each is tokenized twice (alone and after a space)
MAX_BAD_WORD_CHARS = 256  # the length of one bad word: every step looks up each distinct length of its tokens
MAX_LOGIT_BIAS_TOKENS = 4096  # `logit_bias` entries: added to every step's logits
MAX_ALLOWED_TOKEN_IDS = 16384  # `allowed_token_ids`: every step masks the rest of the vocabulary
# -- the APIs' structure (the gateway's bodies) -----------------------------------------------------------------
MAX_PROMPTS = 1024  # a completion's batch of prompts: each is a request of its own
MAX_EMBEDDING_INPUTS = 256  # an embedding request's inputs: a batch this size takes about a second of CPU
MAX_MESSAGES = 8192  # a chat's `messages` (Anthropic's, a response's `input` items, a session's)
MAX_CONTENT_PARTS = 1024  # the content parts (blocks) of one message, or of a system prompt
MAX_TOOL_CALLS = 256  # the tool calls of one assistant message
MAX_TOOLS = 512  # the tools one request shows the model (a response's namespaces' functions counted one by one)
MAX_TEMPLATE_KWARGS = 64  # `chat_template_kwargs` entries
MAX_INCLUDE = 64  # a response request's `include` values
MAX_METADATA = 16  # a response request's `metadata` pairs (OpenAI's own limit)
MAX_DETOKENIZE_TOKENS = 1 << 17  # the tokens one /detokenize call decodes (one tokenizer call that holds the GIL)
