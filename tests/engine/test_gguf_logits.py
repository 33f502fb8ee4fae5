"""A GGUF written with gguf.GGUFWriter runs to the same logits as its dequantized reference in transformers:
F32 (bit-identical weights) and Q8_0 / Q4_0 / Q4_1 (the reference is transformers holding the dequantized weights),
whether decode reads the quantized blocks (the default) or their fp32 copy."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import LLM, SamplingParams
from sagellm.runtime.models.loader import load_model
from tests.oracle import ENGINE_BACKEND, hf_greedy
from tests.tiny_models import make_tiny_llama, make_tiny_qwen2, write_tiny_gguf


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_matches_its_dequantized_reference(tmp_path, arch, qtype):
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
