"""`echo` and prompt logprobs on /v1/completions (and vLLM's `prompt_logprobs` on both endpoints) against the default
model served colocated and through the PD graph, checked against transformers on the same weights: the request
lm-evaluation-harness sends for a loglikelihood (`{"prompt": [[ids]], "max_tokens": 1, "logprobs": 1, "echo": true}`)
gives every prompt token's logprob but the first, also when the prompt's blocks are in the prefix cache."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.gateway.conftest import REPLY_TIMEOUT_S, assert_refused_chat, sdk_client

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(900)]
PROMPT = "Question: What is the capital of France?\nAnswer: The capital of France is Paris"


@pytest.fixture(scope="module")
def hf(smollm2_dir: Path):
    gguf = next(smollm2_dir.glob("*.gguf"))
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, gguf_file=gguf.name, dtype=torch.float32).eval()


@torch.no_grad()
def oracle_logprobs(hf, ids: list[int]) -> list[float]:
    """Each prompt token's logprob given the ones before it (the first has none)."""
    logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    return logprobs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=REPLY_TIMEOUT_S)


def test_lm_eval_loglikelihood_request_equals_transformers(server, hf) -> None:
    ids = server.core.tokenizer.encode(PROMPT, add_special_tokens=True)
    expected = oracle_logprobs(hf, ids)
    body = {"prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    for attempt in range(2):  # the second finds the prompt's blocks in the prefix cache, and recomputes them
        reply = _post(server, "/v1/completions", body)
        assert reply.status_code == 200, reply.text
        (choice,) = reply.json()["choices"]
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(ids) + 1  # the prompt, then the one generated token
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        ours = logprobs["token_logprobs"][1 : len(ids)]
        assert max(abs(a - b) for a, b in zip(ours, expected)) < 1e-3, attempt
        assert choice["text"].startswith(server.core.tokenizer.decode(ids))
        assert "".join(logprobs["tokens"][: len(ids)]) == server.core.tokenizer.decode(ids)


def test_echo_with_max_tokens_0_gives_the_prompt_alone(server) -> None:
    reply = sdk_client(server).completions.create(
        model=server.core.model_name, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0
    )
    (choice,) = reply.choices
    assert choice.text == PROMPT
    count = len(server.core.tokenizer.encode(PROMPT, add_special_tokens=True))
    assert len(choice.logprobs.token_logprobs) == count and choice.logprobs.token_logprobs[0] is None


def test_a_streamed_echo_opens_with_the_prompt(server) -> None:
    stream = sdk_client(server).completions.create(
        model=server.core.model_name, prompt=PROMPT, max_tokens=4, echo=True, temperature=0, stream=True
    )
    texts = [chunk.choices[0].text for chunk in stream if chunk.choices]
    plain = sdk_client(server).completions.create(
        model=server.core.model_name, prompt=PROMPT, max_tokens=4, temperature=0
    )
    assert texts[0].startswith(PROMPT) and "".join(texts) == PROMPT + plain.choices[0].text


def test_vllm_prompt_logprobs_on_both_endpoints(server, hf) -> None:
    ids = server.core.tokenizer.encode(PROMPT, add_special_tokens=True)
    reply = _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 2})
    entries = reply.json()["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    for token, entry, expected in zip(ids[1:], entries[1:], oracle_logprobs(hf, ids)):
        assert entry[str(token)]["logprob"] == pytest.approx(expected, abs=1e-3)
        assert 2 <= len(entry) <= 3 and {1, 2} <= {e["rank"] for e in entry.values()}
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "prompt_logprobs": 0}
    reply = _post(server, "/v1/chat/completions", chat)
    assert reply.status_code == 200, reply.text
    prompt_logprobs = reply.json()["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == reply.json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"echo": True}, "echo", "completions echo their prompt"),
        ({"prompt_logprobs": 21}, "prompt_logprobs", "in [0, 20]"),
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "stream=true"),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_its_field(server, body, param, words) -> None:
    assert_refused_chat(server, body, param, words)


def test_max_tokens_0_without_echo_is_a_400(server) -> None:
    if server.graph != "colocated":
        pytest.skip("the front end's check is the same on every graph")
    reply = _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_tokens", reply.text
