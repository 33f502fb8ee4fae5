"""Rope scalings against the oracle: a tiny Llama with each scaling Hugging Face knows (linear, dynamic, Llama 3.1's
llama3, YaRN with its own attention factor, from mscales, or from the factor alone) gives transformers' logits and
greedy tokens, over prompts long enough to reach the scaled frequencies. (LongRoPE and partial rotary: Phi-3's, in
test_architectures_vs_transformers.py.) Beyond the trained context, `dynamic` takes the NTK base of the engine's
max_model_len."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import LLM, SamplingParams
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.llm_engine import LLMEngine
from tests.oracle import ENGINE_BACKEND, assert_last_logits_match, hf_greedy, random_prompts
from tests.tiny_models import make_tiny_llama

SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 0.707,
                    "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64,
                              "attention_factor": 1.3, "truncate": False},
}  # fmt: skip


@pytest.mark.parametrize("name", list(SCALINGS))
def test_scaled_rope_gives_transformers_logits_and_tokens(name, tmp_path):
    path = make_tiny_llama(tmp_path / name, rope_parameters={"rope_theta": 10000.0, **SCALINGS[name]})
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = random_prompts(hf.config.vocab_size, [9, 40, 90])
    engine = LLMEngine(EngineConfig(model=str(path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=96))
    assert_last_logits_match(engine, hf, prompts)
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = LLM(str(path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=96).generate(prompts, greedy)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 8) for p in prompts]


def test_dynamic_rope_beyond_the_trained_context_takes_the_ntk_base_of_the_engines_length():
    from dataclasses import replace

    from sagellm.runtime.models.rope import inverse_frequencies
    from tests.tiny_models import tiny_model_config

    config = replace(tiny_model_config(), rope_scaling={"rope_type": "dynamic", "factor": 2.0})  # 128 positions
    d, base = config.head_dim, config.rope_theta
    default = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
    torch.testing.assert_close(inverse_frequencies(config, 128), default)
    ntk = base * (2.0 * 512 / 128 - 1) ** (d / (d - 2))  # transformers' formula at a sequence of 512
    torch.testing.assert_close(inverse_frequencies(config, 512), 1.0 / ntk ** (torch.arange(0, d, 2).float() / d))
