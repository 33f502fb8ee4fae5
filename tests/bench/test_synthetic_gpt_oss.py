"""`sagellm bench make-gpt-oss`'s writer (benchmarks/synthetic_gpt_oss.py) on a small shape: llama.cpp's gpt-oss
tensors in their kinds (experts MXFP4, attention and embeddings Q8_0, the rest F32), expert weights at a trained
model's spread, SmolLM2's tokenizer padded to the vocabulary, and a file our loader reads whole, experts as blocks,
and decodes."""

from __future__ import annotations

import gguf
import pytest
from gguf import GGMLQuantizationType

from sagellm import LLM, SamplingParams
from sagellm.benchmarks.synthetic_gpt_oss import GptOssShape, write_gpt_oss_mxfp4
from sagellm.runtime.models.loader import load_model

pytestmark = [pytest.mark.network, pytest.mark.slow]  # the tokenizer is SmolLM2's; a few seconds

SHAPE = GptOssShape(hidden=256, layers=2, experts=4, experts_used=2, intermediate=256, heads=8, kv_heads=2,
                    head_dim=32, vocab=50000, window=8)  # fmt: skip


@pytest.fixture(scope="module")
def written(tmp_path_factory, smollm2_dir):
    path = tmp_path_factory.mktemp("synthetic") / "gpt-oss.gguf"
    return write_gpt_oss_mxfp4(path, SHAPE, tokenizer_from=smollm2_dir, progress=False)


def test_tensors_take_llama_cpps_names_and_kinds(written):
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(written).tensors}
    mxfp4, q8, f32 = GGMLQuantizationType.MXFP4, GGMLQuantizationType.Q8_0, GGMLQuantizationType.F32
    assert types["blk.1.ffn_gate_exps.weight"] == types["blk.1.ffn_down_exps.weight"] == mxfp4
    assert types["blk.1.attn_q.weight"] == types["token_embd.weight"] == types["output.weight"] == q8
    assert types["blk.1.attn_sinks.weight"] == types["blk.1.ffn_gate_exps.bias"] == f32


def test_expert_weights_are_spread_as_a_trained_models(written):
    tensor = next(t for t in gguf.GGUFReader(written).tensors if t.name == "blk.0.ffn_up_exps.weight")
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    assert 0.01 < values.std() < 0.04 and abs(values.mean()) < 1e-3


def test_our_loader_keeps_the_experts_as_blocks_and_decodes(written):
    loaded = load_model(written)
    assert loaded.config.architecture == "gpt_oss" and loaded.config.vocab_size == 50000
    assert loaded.config.window_of(0) == 8 and loaded.config.window_of(1) == 0
    assert sum(w.kind == "MXFP4" for w in loaded.quantized.values()) == 2 * 4 * 3
    out = LLM(str(written), num_kv_blocks=64, max_model_len=256).generate(
        ["Hello there"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    )
    assert len(out[0].outputs[0].token_ids) == 8
