"""`sagellm bench make-qwen35`'s writer (benchmarks/synthetic_qwen35.py) on a small shape: llama.cpp's Qwen3.5
tensors in llama-quantize's Q4_K_M kinds (the DeltaNet's input projection Q5_K, attn_v and ffn_down Q6_K where it
gives more bits, the convolution and decays F32, the decays negative), and a file our loader reads as a Qwen3.5,
its linears as blocks, and decodes."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from sagellm import LLM, SamplingParams
from sagellm.benchmarks.synthetic_qwen35 import Qwen35Shape, write_qwen35_q4_k_m
from sagellm.runtime.models.loader import load_model

pytestmark = [pytest.mark.network, pytest.mark.slow]  # the tokenizer is SmolLM2's; a few seconds

SHAPE = Qwen35Shape(hidden=256, layers=8, intermediate=512, heads=4, kv_heads=2, head_dim=64, linear_key_heads=2,
                    linear_value_heads=4, linear_head_dim=64, vocab=50000)  # fmt: skip


@pytest.fixture(scope="module")
def written(tmp_path_factory, smollm2_dir):
    path = tmp_path_factory.mktemp("synthetic") / "qwen35.gguf"
    return write_qwen35_q4_k_m(path, SHAPE, tokenizer_from=smollm2_dir, progress=False)


def test_tensors_take_llama_cpps_names_and_q4_k_m_kinds(written):
    tensors = {t.name: t for t in gguf.GGUFReader(written).tensors}
    kind = {name: t.tensor_type for name, t in tensors.items()}
    q4, q5, q6, f32 = (GGMLQuantizationType[k] for k in ("Q4_K", "Q5_K", "Q6_K", "F32"))
    assert kind["blk.0.attn_qkv.weight"] == q5 and kind["blk.0.attn_gate.weight"] == q4
    assert kind["blk.0.ssm_conv1d.weight"] == kind["blk.0.ssm_a"] == f32
    assert kind["blk.3.attn_q.weight"] == q4 and kind["token_embd.weight"] == q6
    assert [kind[f"blk.{n}.ffn_down.weight"] for n in (0, 1, 3, 4)] == [q6, q4, q6, q4]  # use_more_bits
    assert (np.asarray(tensors["blk.0.ssm_a"].data) < 0).all()  # -exp(A_log)


def test_our_loader_reads_a_qwen3_5_and_decodes(written):
    loaded = load_model(written)
    config = loaded.config
    assert config.architecture == "qwen3_5" and config.vocab_size == 50000
    assert [config.is_linear_attention(i) for i in range(4)] == [True, True, True, False]
    assert config.rotary_dims == 16 and config.linear_num_value_heads == 4 and config.linear_value_head_dim == 64
    assert loaded.quantized["model.layers.0.linear_attn.in_proj_qkv.weight"].kind == "Q5_K"
    out = LLM(str(written), num_kv_blocks=64, max_model_len=256).generate(
        ["Hello there"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    )
    assert len(out[0].outputs[0].token_ids) == 8
