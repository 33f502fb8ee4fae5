"""The engine's cache for a model with recurrent layers (Qwen3.5), against transformers on the paths where its
states could go wrong: a prefix hit that leaves one token (a decode row that starts from the checkpoint), one-token
prompts in slots earlier sequences used, preemption under a cache too small for the batch (recomputed from zero
states), and the prefix-cache hits counted in the metrics."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import LLM, SamplingParams
from tests import tiny_models
from tests.oracle import hf_greedy, random_prompts

ENGINE = dict(backend="cpu", block_size=4)
TOKENS = 24
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen3_5(tmp_path_factory):
    path = tiny_models.make_tiny_qwen3_5(tmp_path_factory.mktemp("qwen3_5") / "hf")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def test_a_hit_leaving_one_token_decodes_from_the_checkpoint(qwen3_5):
    path, hf = qwen3_5
    llm = LLM(str(path), num_kv_blocks=200, **ENGINE)
    (first,) = random_prompts(hf.config.vocab_size, [13])  # its states are kept after 12 tokens
    llm.generate([first], GREEDY)
    again = first[:12] + [first[12] % (hf.config.vocab_size - 3) + 3]  # 12 cached, one token to compute
    out = llm.generate([again], GREEDY)[0]
    assert out.metrics.num_cached_tokens == 12
    assert out.outputs[0].token_ids == hf_greedy(hf, again, TOKENS)
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits >= 3  # the hit's three blocks, counted where the metrics read them


def test_one_token_prompts_in_used_slots_start_from_zero_states(qwen3_5):
    path, hf = qwen3_5
    llm = LLM(str(path), num_kv_blocks=200, max_num_seqs=2, **ENGINE)
    prompts = random_prompts(hf.config.vocab_size, [9, 1, 1, 7, 1], seed=3)
    outs = llm.generate(prompts, GREEDY)  # two seats: later prompts take seats earlier ones wrote
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, TOKENS) for p in prompts]


def test_preempted_sequences_recompute_their_states(qwen3_5):
    path, hf = qwen3_5
    llm = LLM(str(path), num_kv_blocks=24, max_num_seqs=4, **ENGINE)  # 96 tokens for 4 x (10 + 24): preemption
    prompts = random_prompts(hf.config.vocab_size, [10, 9, 11, 8], seed=5)
    outs = llm.generate(prompts, GREEDY)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, TOKENS) for p in prompts]
