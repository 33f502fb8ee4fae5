"""A GGUF written with gguf.GGUFWriter runs to the same logits as its dequantized reference in transformers:
F32 (bit-identical weights) and Q8_0 / Q4_0 / Q4_1 (the reference is transformers holding the dequantized weights),
whether decode reads the quantized blocks (the default) or their fp32 copy; with --int8-activations, Q4_0 / Q4_1's
against that reference with each of those linears' input rounded as llama.cpp rounds it; the option refused where
no linear can take it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import LLM, SamplingParams
from sagellm.common.errors import FieldError
from sagellm.runtime.models.loader import load_model
from tests.oracle import ENGINE_BACKEND, hf_greedy, round_int8_linears_inputs
from tests.tiny_models import make_tiny_llama, make_tiny_qwen2, write_tiny_gguf


def reference_of(tmp_path, arch: str, qtype: str):
    """A tiny model of `arch` as a GGUF of `qtype`, its load, and transformers holding exactly the weights we load."""
    make = make_tiny_llama if arch == "llama" else make_tiny_qwen2
    hf_dir = make(tmp_path / arch, hidden_size=64, intermediate_size=128)  # rows of 32: whole Q8_0 blocks
    gguf_path = write_tiny_gguf(tmp_path / f"{arch}.{qtype}.gguf", hf_dir, qtype)
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    loaded = load_model(gguf_path)
    if qtype != "F32":  # the reference holds exactly the dequantized weights we load
        state = dict(loaded.weights)
        if reference.config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        missing, unexpected = reference.load_state_dict(state, strict=False)
        assert not unexpected and all("rotary" in m for m in missing)
    return gguf_path, loaded, reference


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_matches_its_dequantized_reference(tmp_path, arch, qtype):
    gguf_path, loaded, reference = reference_of(tmp_path, arch, qtype)
    prompt = torch.randint(3, reference.config.vocab_size, (19,), generator=torch.Generator().manual_seed(0)).tolist()
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)
    expected = hf_greedy(reference, prompt, 8)
    llm = LLM(str(gguf_path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=64)
    out = llm.generate([prompt], greedy)[0]
    assert out.outputs[0].token_ids == expected
    if qtype != "F32":
        assert llm.engine.model.quantized == {} and loaded.quantized, "blocks were kept, and handed to the plan"
        dense = LLM(str(gguf_path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=64, quantized_weights=False)
        assert dense.generate([prompt], greedy)[0].outputs[0].token_ids == expected
    with torch.no_grad():
        ref_logprobs = torch.log_softmax(reference(torch.tensor([prompt])).logits[0, -1], -1)
    first = out.outputs[0].logprobs[0]
    assert first.logprob == pytest.approx(ref_logprobs[first.token_id].item(), abs=1e-4)


@pytest.mark.skipif(ENGINE_BACKEND != "cpu", reason="int8 activations are the cpu backend's native kernels")
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int8_activations_match_the_reference_with_each_linears_input_rounded(tmp_path, arch, qtype):
    """The oracle of --int8-activations: transformers on the same weights, each linear whose weight we keep as
    Q4_0/Q4_1 blocks (the tied lm_head's too) taking its input rounded as llama.cpp rounds it (a forward pre-hook).
    Greedy tokens and logprobs as tight as the exact path's (the K-quants': test_kquant_model.py)."""
    gguf_path, loaded, reference = reference_of(tmp_path, arch, qtype)
    round_int8_linears_inputs(reference, loaded.quantized)
    prompt = torch.randint(3, reference.config.vocab_size, (19,), generator=torch.Generator().manual_seed(0)).tolist()
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)
    llm = LLM(str(gguf_path), backend="cpu", block_size=4, num_kv_blocks=64, int8_activations=True)
    out = llm.generate([prompt], greedy)[0].outputs[0]
    assert out.token_ids == hf_greedy(reference, prompt, 8)
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + out.token_ids[:-1]])).logits[0, len(prompt) - 1 :]
    expected = torch.log_softmax(logits, -1)
    for step, chosen in enumerate(out.logprobs):
        assert chosen.logprob == pytest.approx(expected[step, chosen.token_id].item(), abs=1e-4)


@pytest.mark.skipif(ENGINE_BACKEND != "cpu", reason="int8 activations are the cpu backend's native kernels")
def test_int8_activations_are_refused_where_no_linear_can_take_them(tmp_path):
    gguf_path, _, _ = reference_of(tmp_path, "llama", "Q8_0")
    refusal = "int8_activations: only linears on Q4_0, Q4_1, Q4_K, Q5_K, Q6_K blocks .* blocks: Q8_0"
    with pytest.raises(FieldError, match=refusal):
        LLM(str(gguf_path), backend="cpu", block_size=4, num_kv_blocks=64, int8_activations=True)
