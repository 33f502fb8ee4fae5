"""Prompt logprobs against the oracle: every prompt token's logprob given the ones before it (and its rank and top-k)
equals log_softmax of transformers' logits on the same weights, whole, through chunked prefill, after a prefix-cache
hit (the cached prefix is recomputed for its logits) and across a preemption (nothing scored twice)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import LLM, SamplingParams
from tests.oracle import ENGINE_BACKEND, hf_greedy, random_prompts, step_shapes
from tests.tiny_models import make_tiny_llama

TOP = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("llama") / "llama")
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def oracle(hf, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, V]: row i is the log-distribution of token i + 1 given the tokens before it."""
    return torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)


def assert_matches_oracle(prompt_logprobs, prompt: list[int], expected: torch.Tensor) -> None:
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(prompt)
    for i, entry in enumerate(prompt_logprobs[1:]):
        row = expected[i]
        assert entry.token_id == prompt[i + 1]
        assert entry.logprob == pytest.approx(row[prompt[i + 1]].item(), abs=1e-4)
        assert entry.rank == int((row > row[prompt[i + 1]]).sum()) + 1
        top_ids = [t for t, _ in entry.top]
        assert len(top_ids) == TOP and set(top_ids) == set(row.topk(TOP).indices.tolist())


@step_shapes
def test_prompt_logprobs_equal_transformers(tiny, engine_args):
    path, hf = tiny
    llm = LLM(str(path), backend=ENGINE_BACKEND, block_size=4, **({"num_kv_blocks": 64} | engine_args))
    prompts = random_prompts(hf.config.vocab_size, [5, 30, 17, 9])
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=TOP)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        assert_matches_oracle(out.prompt_logprobs, prompt, oracle(hf, prompt))
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)  # sampled from the right rows
    if "num_kv_blocks" in engine_args:
        assert sum(o.metrics.num_preemptions for o in outs) > 0


def test_a_cached_prefix_is_recomputed_for_its_logprobs(tiny):
    path, hf = tiny
    llm = LLM(str(path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=64)
    prompt = random_prompts(hf.config.vocab_size, [21], seed=3)[0]
    greedy = SamplingParams(max_tokens=2, temperature=0)
    llm.generate([prompt], greedy)  # its blocks are now in the prefix cache
    assert llm.generate([prompt], greedy)[0].metrics.num_cached_tokens == 20
    out = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=TOP))[0]
    assert out.metrics.num_cached_tokens == 0
    assert_matches_oracle(out.prompt_logprobs, prompt, oracle(hf, prompt))


def test_without_prompt_logprobs_the_output_has_none(tiny):
    path, hf = tiny
    llm = LLM(str(path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=64)
    out = llm.generate(random_prompts(hf.config.vocab_size, [6]), SamplingParams(max_tokens=2))[0]
    assert out.prompt_logprobs is None
