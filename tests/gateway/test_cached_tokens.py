"""Prefix-cache hits reach the client in every API's usage: `prompt_tokens_details.cached_tokens` in chat and
completions, `input_tokens_details.cached_tokens` in responses, `cache_read_input_tokens` in messages; a repeated
prompt hits its cached blocks, and vLLM's `cache_salt` keeps prompts of different salts apart (no block shared)."""

from __future__ import annotations

import anthropic
import pytest

from tests.gateway.conftest import sdk_client

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(900)]

# Long enough for several full KV blocks (16 tokens each), and its own: no other test's prompt shares its prefix.
PROMPT = "Cached tokens, a test of its own: " + " ".join(f"item {i} is number {i * 7 % 11};" for i in range(40))


def test_a_repeated_prompt_reports_its_cached_tokens_and_a_salt_keeps_tenants_apart(server) -> None:
    if server.graph != "colocated":
        pytest.skip("PD's decode worker imports the prefill's KV: the prefill engine's hits are what count")
    sdk = sdk_client(server)
    model = server.core.model_name

    def chat(salt: str | None) -> tuple[int, int]:
        extra = {"cache_salt": salt} if salt is not None else {}
        chat = [{"role": "system", "content": PROMPT}, {"role": "user", "content": "Go on."}]  # its own first block
        usage = sdk.chat.completions.create(model=model, max_tokens=1, temperature=0, extra_body=extra,
                                            messages=chat).usage  # fmt: skip
        return usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens

    prompt_tokens, first = chat(None)
    assert first == 0 and prompt_tokens > 200
    _, again = chat(None)
    assert again == (prompt_tokens - 1) // 16 * 16  # every full block but the one holding the last token
    assert chat("tenant-a")[1] == 0  # the same tokens under a salt share nothing with the unsalted ones
    assert chat("tenant-a")[1] == again  # ... and hit their own
    assert chat("tenant-b")[1] == 0

    for seen in (False, True):  # a completion's prompt is the text alone, not the chat rendering of it
        completion = sdk.completions.create(model=model, prompt=PROMPT, max_tokens=1, temperature=0).usage
        assert (completion.prompt_tokens_details.cached_tokens > 0) == seen
    response = sdk.responses.create(model=model, input=PROMPT, max_output_tokens=16, temperature=0).usage
    again = sdk.responses.create(model=model, input=PROMPT, max_output_tokens=16, temperature=0).usage
    assert again.input_tokens_details.cached_tokens > response.input_tokens_details.cached_tokens
    messages = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=300)
    message = messages.messages.create(model=model, max_tokens=1, messages=[{"role": "user", "content": PROMPT}],
                                       extra_body={"temperature": 0}).usage  # fmt: skip
    # the message is the responses' chat (the user's PROMPT), so its prefix is cached
    assert message.cache_read_input_tokens > 0 and message.input_tokens < message.cache_read_input_tokens
