"""gpt-oss as it ships, its experts in MXFP4, against transformers reading the same files (it dequantizes them on
the CPU): from the Hugging Face checkpoint (`*_blocks`, `*_scales`) and from the GGUF llama.cpp's converter would
write (experts in GGUF's MXFP4), each expert kept as its blocks and multiplied by the native MXFP4 kernels, never
expanded to floats: prefill logits within fp32 tolerance, greedy tokens identical for 16 prompts in one batch,
whole and chunked."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import LLM, SamplingParams
from sagellm.backends.cpu_linear import CpuLinearWeight
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.llm_engine import LLMEngine
from sagellm.runtime.models.loader import load_model
from tests import tiny_models
from tests.oracle import assert_last_logits_match, hf_greedy, random_prompts

TOKENS = 32
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
ENGINE = dict(backend="cpu", block_size=4, num_kv_blocks=400)
LENGTHS = [5, 30, 17, 9, 1, 24, 12, 3, 20, 11, 28, 7, 15, 2, 26, 19]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the MXFP4 checkpoint, its GGUF, transformers' model of the checkpoint, prompts, its greedy tokens)."""
    root = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    path = tiny_models.make_tiny_gpt_oss_mxfp4(root / "hf")
    dense = tiny_models.make_tiny_gpt_oss(root / "dense")  # the same random model before its experts were rounded
    gguf_path = tiny_models.write_tiny_gguf(root / "model.gguf", dense, "MXFP4")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    prompts = random_prompts(hf.config.vocab_size, LENGTHS)
    return path, gguf_path, hf, prompts, [hf_greedy(hf, p, TOKENS) for p in prompts]


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_every_expert_is_kept_as_mxfp4_blocks(tiny, source):
    path = tiny[0] if source == "hf" else tiny[1]
    loaded = load_model(path, load_tokenizer=False)
    experts = {name: w for name, w in loaded.quantized.items() if ".experts." in name}
    config = loaded.config
    assert len(experts) == config.num_layers * config.num_experts * 3
    assert {w.kind for w in experts.values()} == {"MXFP4"}
    engine = LLMEngine(EngineConfig(model=str(path), **ENGINE))
    moes = [instr for instr in engine.runner.plan.instrs if instr.node.startswith("moe")]
    for instr in moes:  # the held experts as the native kernels' packing, not float tensors
        gate_up, down = instr.consts[0].gate_up, instr.consts[0].down
        assert all(isinstance(w, CpuLinearWeight) for w in [*gate_up, *down])


def test_prefill_logits_match_transformers(tiny):
    path, _, hf, prompts, _ = tiny
    assert_last_logits_match(LLMEngine(EngineConfig(model=str(path), **ENGINE)), hf, prompts[:4])


@pytest.mark.parametrize("source", ["hf", "gguf"])
@pytest.mark.parametrize("batched_tokens", [512, 8], ids=["whole", "chunked"])
def test_greedy_tokens_identical_in_a_continuous_batch(tiny, source, batched_tokens):
    path, gguf_path, _, prompts, expected = tiny
    llm = LLM(str(path if source == "hf" else gguf_path), max_num_batched_tokens=batched_tokens, **ENGINE)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == expected
